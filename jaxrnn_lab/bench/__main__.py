"""``python -m jaxrnn_lab.bench``: the benchmark's command line."""

import sys

from jaxrnn_lab.bench.cli import main

sys.exit(main())
