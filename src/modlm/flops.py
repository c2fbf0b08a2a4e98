"""``modlm.flops``: the public home of the FLOPs functions (``forward_flops(cfg, seq_len)`` and the
rest), which live in ``modlm.analysis.flops``."""

from .analysis.flops import *  # noqa: F401,F403
from .analysis.flops import __all__  # noqa: F401
