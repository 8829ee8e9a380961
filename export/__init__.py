"""gmner.export: merge LoRA, export ONNX graphs, build engines and write bundles.

Installed as ``gmner.export`` from the repository folder ``export/``.
"""
