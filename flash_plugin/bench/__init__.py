"""The benchmark library behind ``flash-plugin bench``, ``demo`` and ``reconstruct``, and its scripts.

`reconstruct` degrades test images and reconstructs them per method; `paired` is the paired
benchmark; `suite` runs it over the hyperparameter table; `demo` and `reconstruct_files` hold the
demo's stages and the reconstruction of your own files; `tune`, `model_card_metrics`,
`mixed_starts` and `solver_overhead` are scripts (``python -m flash_plugin.bench.<name>``).
"""
