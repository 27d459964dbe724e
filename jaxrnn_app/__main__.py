"""``python -m jaxrnn_app``: the same as the ``jaxrnn`` command."""

import sys

from jaxrnn_app.cli import main

sys.exit(main())
