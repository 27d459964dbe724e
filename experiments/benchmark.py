"""The training-step benchmark (issue #5): jaxrnn bptt vs autodiff vs PyTorch vs Flax vs the product floor.

The benchmark lives in the package (``jaxrnn/bench/``, one module per role; its
``__init__`` documents what is measured and how) so that the installed
``jaxrnn bench`` command runs it too; this script is the same thing. Next to the
steps it times the *product floor*: the step's matrix products alone (the 2T
dependent small products per layer and direction, the input projection, readout
and weight-gradient products), each with the fastest of XLA, numpy and PyTorch;
``floor/bptt`` and ``floor/torch`` are reported.

    python experiments/benchmark.py --quick --out /tmp/b     # seconds
    python experiments/benchmark.py --out results/bench      # the full grid (tens of minutes on 2 cores)

It writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` under ``--out``.
"""

import sys

from jaxrnn.bench import main

if __name__ == "__main__":
    sys.exit(main())
