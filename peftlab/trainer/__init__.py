"""The training loop (``loop``) and what it is built from (``setup``): its state and data order
(``state``), guards against non-finite steps and loss spikes (``guards``), preemption by signals
(``preemption``), early stopping (``early_stopping``); sweeps run it many times (``sweep``).
"""
