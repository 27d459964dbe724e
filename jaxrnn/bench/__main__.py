"""``python -m jaxrnn.bench``: the benchmark's command line."""

import sys

from jaxrnn.bench.cli import main

sys.exit(main())
