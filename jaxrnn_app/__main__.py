"""``python -m jaxrnn_app``: the same as the ``jaxrnn`` command."""

import sys

try:
    from jaxrnn_app.cli import main
except KeyboardInterrupt:  # Ctrl-C before the command could take it: quietly
    sys.exit(130)

sys.exit(main())
