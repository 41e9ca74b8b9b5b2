"""The base model: a hub id, a local directory or the built-in model (``builtin``) loaded with transformers
(``load``), 4-bit NF4/FP4 weights streamed tensor by tensor (``quantized_load``), safetensors shards read and
written in one place (``shards``), and the backbone + classification head of classification runs (``classifier``).
"""
