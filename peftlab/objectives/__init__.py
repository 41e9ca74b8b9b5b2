"""What the loss of a batch is: the Objective interface and ``build_objective`` (``objective``, with the
causal-LM objective), the causal-LM loss itself (``causal_lm``), sequence classification / regression
(``classification``), distillation from a teacher (``distillation``; the teacher and its vocabulary checks in
``teacher``, its stored top-k outputs in ``teacher_cache``). The trainer asks the objective; it never branches
on the task.
"""
