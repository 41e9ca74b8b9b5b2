"""Adapters: LoRA layers (``lora_layer``), injection into models (``lora_inject``) and the PEFT file
format (``peft_format``). The public API is re-exported by :mod:`peftlab.lora`."""
