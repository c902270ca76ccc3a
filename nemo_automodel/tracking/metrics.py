"""Metrics sinks on rank 0: JSON lines, TensorBoard, experiment trackers (W&B, MLflow: ``trackers.py``)
and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nemo_automodel.errors import first_line
from nemo_automodel.tracking.trackers import Tracker, start_trackers

log = logging.getLogger(__name__)


class MetricsLogger:
    """Append ``{"step": ..., **metrics}`` rows to ``metrics.jsonl``, TensorBoard scalars and each tracker.

    Trackers start here (rank 0; a failure is a one-line ConfigError before the first step); one that
    fails later is warned about once and dropped, and training goes on."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0,
                 trackers: list[Tracker] | None = None, params: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        self.trackers = start_trackers(list(trackers or []), Path(run_dir), dict(params or {}), resume_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_rows_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _each_tracker(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # a tracker must not end a training run
                self.trackers.remove(tracker)
                log.warning("%s failed (%s: %s); it gets no more metrics in this run (metrics.jsonl goes on)",
                            tracker.label, type(err).__name__, first_line(err))

    def _drop_rows_after(self, step: int) -> None:
        """On resume, forget rows a killed run logged past the checkpoint it resumes from."""
        if self.path.is_file():
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        self._each_tracker("log", step, metrics)

    def close(self) -> Path | None:
        """Flush TensorBoard, draw ``loss.png`` and end the trackers' runs with it; returns the plot's path."""
        if not self.enabled:
            return None
        if self.writer is not None:
            self.writer.close()
        plot = plot_loss(self.path, self.path.parent / "loss.png")
        self._each_tracker("finish", plot, "FINISHED")
        return plot

    def abort(self, status: str = "FAILED") -> None:
        """End the trackers' runs of a run that stopped early (``KILLED``: preempted or interrupted)."""
        if self.writer is not None:
            self.writer.flush()
        self._each_tracker("finish", None, status)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """Train (and validation) loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "val_loss" else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
