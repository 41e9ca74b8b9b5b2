"""After training: held-out loss, perplexity and generation metrics (``evaluate``), text generation
(``generate``) and classification batch inference (``predict``).
"""
