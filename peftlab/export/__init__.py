"""Out of peftlab: an adapter merged into its base (``merge``, with a fidelity report), adapters combined
into one (``combine``), GGUF files for llama.cpp (``gguf``, ``gguf_vocab``), validated PEFT adapters
(``peft``) and hub uploads with a model card (``hub``).
"""
