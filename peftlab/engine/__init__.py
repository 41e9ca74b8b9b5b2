"""Which engine runs the step: one process (``local``) or DeepSpeed ZeRO (``deepspeed``) behind one interface
(``base``); the process group (``process_group``), multi-node launch (``launch``), the memory planner
(``planner``) and host memory / CPU threads (``hostmem``).
"""
