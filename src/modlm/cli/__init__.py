"""The command lines: ``train`` (LightningCLI, behind ``train.py`` and ``modlm-train``), ``eval``
(behind ``eval.py`` and ``modlm-eval``) and ``prepare`` (``modlm-prepare``)."""
from .train import CONFIGS_DIR, DEFAULT_CONFIG

__all__ = ["CONFIGS_DIR", "DEFAULT_CONFIG"]
