"""``python -m persample ...``, as the ``persample`` command; what ``torchrun -m persample train`` runs per rank."""

import sys

from persample.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
