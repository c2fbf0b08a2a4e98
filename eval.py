"""Evaluate a trained modlm checkpoint: ``python eval.py CKPT [--json OUT] [--compare CKPT2] ...``.

Reports loss, perplexity and bits per byte under both routing modes, the capacity routed blocks
really use, the causal decision's accuracy against top-k, FLOPs per token and decode speed.
``python eval.py --help`` lists every option; see README.md.
"""

import sys

from modlm.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
