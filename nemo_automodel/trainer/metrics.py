"""Deprecated path: the metrics moved to ``nemo_automodel.tracking.metrics``."""

import warnings

from nemo_automodel.tracking.metrics import MetricsLogger, plot_loss, read_metrics

warnings.warn("nemo_automodel.trainer.metrics moved to nemo_automodel.tracking.metrics", DeprecationWarning,
              stacklevel=2)

__all__ = ["MetricsLogger", "plot_loss", "read_metrics"]
