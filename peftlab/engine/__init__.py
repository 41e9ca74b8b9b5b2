"""Which engine runs the step: one process (``local``) or DeepSpeed ZeRO (``deepspeed``) behind one interface
(``interface``); the process group (``process_group``), multi-node launch (``launch``), the memory planner
(``planner``; the model counted on the meta device in ``model_shape``; ``train.auto_fit`` and out-of-memory
advice in ``memory_fit``; distillation's teacher and KD loss in ``planner_distill``) and host memory / CPU threads
(``hostmem``).
"""
