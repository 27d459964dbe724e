"""The training-step benchmark (issue #5): jaxrnn bptt vs autodiff vs PyTorch vs Flax.

The benchmark lives in the package (``jaxrnn/bench.py``) so that the installed
``jaxrnn bench`` command runs it too; this script is the same thing:

    python experiments/benchmark.py --quick --out /tmp/b     # seconds
    python experiments/benchmark.py --out results/bench      # the full grid (~20 min on 2 cores)

It writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` under ``--out``.
"""

import sys

from jaxrnn.bench import main

if __name__ == "__main__":
    sys.exit(main())
