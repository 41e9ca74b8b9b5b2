"""LoRA, the only LoRA API: layers (``lora_layer``), injection into a model's module instances
(``lora_inject``), the PEFT file format (``peft_format``), the delta/merge arithmetic (``arithmetic``),
which layers train and with which learning rates (``freezing``), and the chat template that travels
with an adapter (``chat_template``).
"""
