"""Train, validate or test a Mixture-of-Depths LM: ``python train.py fit|validate|test [--config FILE] ...``.

``python train.py fit`` with no other argument trains the default MoD model (configs/default.yaml)
on the default corpus (the Python standard library's source). ``python train.py fit --help`` lists
every option; see README.md.
"""

import sys

from modlm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
