"""The lab: the benchmark (``jaxrnn_lab.bench``, behind ``jaxrnn bench``), the
performance investigations (``jaxrnn_lab.perf``) and the experiment harness
(``jaxrnn_lab.harness``). It uses the library and the run application; neither
imports it.
"""
