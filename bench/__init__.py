"""gmner.bench: measurements of gmner against its peers and at real scale, kept apart from
what a device installs.

A separate distribution (``gmner-bench``, this folder's ``pyproject.toml``) so that a board
installing gmner's runtime carries none of it: ``gmner bench`` (gmner_rt against HF
transformers and onnxruntime-genai, :mod:`.peers` and :mod:`.workers`), ``gmner bench
speculation`` (speculative decoding side by side, :mod:`.speculation` and
:mod:`.speculation_peers`), the grammar engines compared (:mod:`.grammar_engines`), decoder
graphs timed side by side (:mod:`.decoder_graphs`), decoding variants of one bundle
(:mod:`.decoding_variants`), the memory-bandwidth probes (:mod:`.bandwidth`), and the
real-scale training and export runs on a GPU (:mod:`.train_at_scale`,
:mod:`.export_at_scale`). It sits above every layer and may import any of them. Timing a
bundle with gmner_rt alone stays in the runtime: ``gmner time``.
"""
