"""``python -m curvlab``: the same command line as the ``curvlab`` script."""

import sys

from curvlab.app.console import main

if __name__ == "__main__":
    sys.exit(main())
