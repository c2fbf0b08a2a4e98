"""``python -m modlm.prepare SOURCE OUT``: the prepare command (``modlm.cli.prepare``), also
installed as ``modlm-prepare``."""

import sys

from .cli.prepare import main

if __name__ == "__main__":
    sys.exit(main())
