"""lm-evaluation-harness on modlm models: ``ModLMHarness`` (``lm.py``, lm-eval's model interface),
the routing it runs with (``modes.py``), what the routed blocks processed (``usage.py``) and running
tasks into flat keys (``tasks.py``, ``evaluate_tasks``). Only ``lm.py`` imports lm_eval at the top."""

from .tasks import HarnessError, evaluate_tasks

__all__ = ["HarnessError", "evaluate_tasks"]
