"""Tracker factories for the command line: ``log.mlflow=mlflow`` / ``log.wandb=wandb`` on any recipe.

    python recipes/smollm2_135m.py log.mlflow="mlflow(tracking_uri='http://127.0.0.1:5000')" --yes
    python recipes/smollm2_135m.py log.wandb=wandb log.wandb.project=smollm --yes     # offline run folder
    python recipes/smollm2_135m.py log.wandb="wandb(offline=False)" --yes            # live (needs a W&B key)

The graph's values are recorded as the tracker run's params (`nemo_automodel.launch.tracker_params`).
"""

# No `from __future__ import annotations`: NeMo-Run evaluates the factories' return annotations.

import nemo_run as run

from nemo_automodel.tracking import MLflowLogger, WandbLogger


@run.cli.factory
def mlflow(tracking_uri: str | None = None, experiment_name: str = "nemo_automodel",
           run_name: str | None = None) -> run.Config[MLflowLogger]:
    """MLflow: a server (``http://host:port``), ``sqlite:///path.db``, ``file:/path``; None:
    ``MLFLOW_TRACKING_URI`` or ``sqlite:///<log_dir>/mlflow.db``."""
    return run.Config(MLflowLogger, tracking_uri=tracking_uri, experiment_name=experiment_name, run_name=run_name)


@run.cli.factory
def wandb(project: str = "nemo_automodel", name: str | None = None, entity: str | None = None,
          offline: bool = True) -> run.Config[WandbLogger]:
    """Weights & Biases, offline by default (``<run_dir>/wandb/offline-run-*``, ``wandb sync`` later)."""
    return run.Config(WandbLogger, project=project, name=name, entity=entity, offline=offline)
