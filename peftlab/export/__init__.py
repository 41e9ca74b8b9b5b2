"""Out of peftlab: an adapter merged into its base (``merge``; the base as training saw it: ``source``; the fidelity
report: ``fidelity``), adapters combined into one (``combine``, on PEFT's ``merge_utils``), GGUF files for
llama.cpp (``gguf``, ``gguf_vocab``), validated PEFT adapters (``peft``) and hub uploads with a model card (``hub``).
"""
