"""Checkpoints: the one atomic write (``atomic``), the checkpoint store with verification and rotation
(``store``), resuming a run exactly (``resume``) and the RNG states it restores (``rng``).
"""
