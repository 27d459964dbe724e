"""``python -m jaxrnn``: the same as the ``jaxrnn`` command."""

import sys

from jaxrnn.cli import main

sys.exit(main())
