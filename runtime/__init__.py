"""gmner.runtime: what runs on the device around gmner_rt (CLI, evaluation, benchmarks).

Installed as ``gmner.runtime`` from the repository folder ``runtime/``. It imports gmner_rt;
training and export commands are imported lazily, only when they are asked for.
"""
