"""Evaluate a trained checkpoint (loss, perplexity, bits per byte, routing accuracy, decode speed).

Not built yet: it lands with issue #6 ("eval.py and KV-cached generation with causal routing").
"""
import sys

if __name__ == "__main__":
    sys.exit("eval.py: not yet implemented (issue #6); train with `python train.py fit` meanwhile.")
