"""The command lines: ``train`` (LightningCLI, behind ``train.py`` and ``modlm-train``), ``eval`` (behind
``eval.py`` and ``modlm-eval``), ``prepare`` (``modlm-prepare``) and ``generate`` (``modlm-generate``).
Nothing is imported here, so that ``usage`` (how a refused command line reads, which ``modlm-serve``
shares) loads without the training code."""
