"""The run application behind the ``jaxrnn`` command: tasks, runs, checkpoints, plots.

It uses the library (``import jaxrnn``); the library never imports it. The
command's entry point, ``jaxrnn_app.cli:main``, imports the library only when a
command runs, so ``jaxrnn --help`` answers without importing JAX.
"""
