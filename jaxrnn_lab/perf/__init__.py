"""Performance investigations: one script each, ``python -m jaxrnn_lab.perf.NAME [--quick] [--out DIR]``."""
