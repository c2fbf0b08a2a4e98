"""``python -m modlm.serve MODEL ...``: ``modlm-serve``."""

import sys

from .command import main

sys.exit(main())
