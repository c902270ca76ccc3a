"""What a run reports: metrics on rank 0 (``metrics.py``: JSONL, TensorBoard, loss.png) and the experiment
trackers they feed (``trackers.py``: Weights & Biases, MLflow)."""

from nemo_automodel.tracking.metrics import MetricsLogger, read_metrics
from nemo_automodel.tracking.trackers import MLflowLogger, WandbLogger

__all__ = ["MLflowLogger", "MetricsLogger", "WandbLogger", "read_metrics"]
