"""What a run reports: the run log (metrics.jsonl and the loss-curve plot, ``runlog``), experiment trackers
(TensorBoard, MLflow, W&B: ``trackers``) and console messages through ``logging`` (``console``).
"""
