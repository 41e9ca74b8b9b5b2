"""The training loop (``loop``) and what it is built from (``setup``): its state and data order (``state``),
guards against non-finite steps and loss spikes (``guards``), preemption by signals (``preemption``), out of
memory and disk-full messages (``failures``), early stopping (``early_stopping``), the end of a run
(``summary``) and the fault-injection hooks of the fault-tolerance tests (``fault_injection``); sweeps run it
many times (``sweep``).
"""
