"""Checkpoints: the one atomic write (``atomic``), the checkpoint store with verification and rotation
(``store``), what a training run's checkpoint holds and writing it (``save``), resuming a run exactly
(``resume``) and the RNG states it restores (``rng``).
"""
