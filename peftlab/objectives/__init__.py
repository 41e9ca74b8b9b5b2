"""What the loss of a batch is: one objective object per kind of run — causal LM (``causal_lm``),
sequence classification / regression (``classification``), distillation from a teacher (``distillation``,
its stored top-k ``teacher_cache``). The trainer asks the objective; it never branches on the task.
"""
