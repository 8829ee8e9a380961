"""gmner.train: fine-tuning (LoRA, GRBP, CoT), training data and checkpoint evaluation.

Installed as ``gmner.train`` from the repository folder ``train/``. Importing the package is
light; modules that need torch import it themselves.
"""
