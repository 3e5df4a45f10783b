"""``python -m persample``: the ``persample`` command (:mod:`persample.app.cli`)."""

import sys

from persample.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
