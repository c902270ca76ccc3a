"""Experiment trackers on rank 0: Weights & Biases and MLflow, beside metrics.jsonl and TensorBoard.

    log = NeMoLogger(log_dir="runs", name="lora",
                     wandb=WandbLogger(project="smollm"),                        # offline unless offline=False
                     mlflow=MLflowLogger(tracking_uri="http://127.0.0.1:5000"))  # or sqlite:///…, file:…

Each tracker gets the run's params (a recipe graph's values, flattened by
``nemo_automodel.launch.tracker_params``; else a small set read from the built objects, see
`object_params`), every row of metrics.jsonl at its step, and ``loss.png`` at the end.

Lifecycle (``MetricsLogger`` drives it): ``check(run_dir)`` before anything loads (the package is
importable, the URI is usable: a one-line ``ConfigError`` naming the extra otherwise), ``start`` on
rank 0 where metrics start (a failure there is a ``ConfigError`` too, still before the first step),
``log`` per logged step and ``finish`` at the end. A failure while training only warns, once, and that
tracker stops receiving; training and the other sinks go on.

Resume: each tracker keeps its run id in the run folder (``wandb_run.json``, ``mlflow_run.json``). A
run resumed from a checkpoint (step > 0) continues the same tracker run: MLflow reopens the run id
(steps replayed after the checkpoint are logged again at the same step numbers: resume is exact, so
the values agree); W&B passes the id with ``resume="allow"`` and logs against ``trainer/global_step``
so replayed steps are kept. A run that starts at step 0 starts a new tracker run.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlparse

from nemo_automodel.contracts import DataModule, OptimizerModule, PeftMethod, TrainableModel
from nemo_automodel.errors import ConfigError, bad_value, first_line

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from wandb import Run

log = logging.getLogger(__name__)

EXTRA = "pip install 'nemo-automodel-day0[trackers]'"
STEP_KEY = "trainer/global_step"  # W&B's x axis (Lightning's name): replayed steps after a resume are kept
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value


class Tracker:
    """The interface `MetricsLogger` drives; subclasses are plain, picklable configuration until ``start``."""

    label = "tracker"

    def check(self, run_dir: Path) -> None:
        """Cheap checks before anything loads (package importable, URI usable); raise ConfigError."""

    def start(self, run_dir: Path, params: dict[str, Any], resume_step: int) -> None:
        raise NotImplementedError

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, plot: Path | None, status: str) -> None:
        """End the run: ``status`` is ``FINISHED``, ``FAILED`` or ``KILLED``; ``plot`` is loss.png or None."""
        raise NotImplementedError

    def _import(self, module: str) -> ModuleType:
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"{type(self).__name__} needs the {module} package ({first_line(err)}): "
                              f"{EXTRA}") from None


class WandbLogger(Tracker):
    """Weights & Biases. ``offline=True`` (the default) writes ``<run_dir>/wandb/offline-run-*`` and never
    touches the network or needs an API key; upload later with ``wandb sync --id <id> <run_dir>/wandb/offline-run-*``
    (``--id`` from ``wandb_run.json``: after resumes there is one folder per attempt, synced in order).
    ``offline=False`` logs live (``WANDB_API_KEY`` or ``wandb login`` needed). ``name`` defaults to the
    run's ``NeMoLogger`` name; ``save_dir`` (where ``wandb/`` goes) to the run directory."""

    label = "wandb"

    def __init__(self, project: str = "nemo_automodel", name: str | None = None, entity: str | None = None,
                 offline: bool = True, tags: list[str] | None = None, group: str | None = None,
                 save_dir: str | None = None) -> None:
        if not isinstance(project, str) or not project:
            raise bad_value("WandbLogger: project", project, "use a non-empty project name")
        if not isinstance(offline, bool):
            raise bad_value("WandbLogger: offline", offline, "use True or False")
        self.project, self.name, self.entity, self.offline = project, name, entity, offline
        self.tags, self.group, self.save_dir = list(tags or []), group, save_dir
        self._run: Run | None = None
        self.run_id: str | None = None

    def check(self, run_dir: Path) -> None:
        self._import("wandb")

    def start(self, run_dir: Path, params: dict[str, Any], resume_step: int) -> None:
        wandb = self._import("wandb")
        state = Path(run_dir) / "wandb_run.json"
        saved = _read_json(state) if resume_step > 0 else {}
        self.run_id = saved.get("id") or uuid.uuid4().hex[:8]  # W&B's own ids look the same
        save_dir = Path(self.save_dir or run_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(mode="offline" if self.offline else "online", silent=True)
        if self.offline:
            _next_second_after_attempts(save_dir / "wandb", self.run_id)
        run = self._run = wandb.init(project=self.project, entity=self.entity, name=self.name or Path(run_dir).name,
                                     id=self.run_id, resume="allow", dir=str(save_dir), tags=self.tags or None,
                                     group=self.group, settings=settings, reinit="create_new")
        run.config.update(params, allow_val_change=True)
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
        self._step = resume_step
        _write_json(state, {"id": self.run_id, "project": self.project, "entity": self.entity,
                            "offline": self.offline, "dir": run.dir and str(Path(run.dir).parent)})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._run is None:
            raise RuntimeError("WandbLogger.log before start (or after finish)")
        self._step = step
        self._run.log({**metrics, STEP_KEY: step})

    def finish(self, plot: Path | None, status: str) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            if plot is not None and Path(plot).is_file():
                import wandb

                run.log({"loss_curve": wandb.Image(str(plot)), STEP_KEY: self._step})
        finally:
            run.finish(exit_code=0 if status == "FINISHED" else 1)


class MLflowLogger(Tracker):
    """MLflow. ``tracking_uri``: ``http(s)://host:port`` (an ``mlflow server``), ``sqlite:///path.db`` or
    ``file:/path``; None takes ``MLFLOW_TRACKING_URI``, else ``sqlite:///<log_dir>/mlflow.db`` with
    artifacts in ``<log_dir>/mlartifacts`` (browse with ``mlflow ui --backend-store-uri sqlite:///…``).
    ``run_name`` defaults to the run's ``NeMoLogger`` name. A server is probed before anything loads
    (no retries); MLflow's own ``MLFLOW_HTTP_REQUEST_*`` settings apply while training."""

    label = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "nemo_automodel",
                 run_name: str | None = None, tags: dict[str, str] | None = None) -> None:
        if tracking_uri is not None and (not isinstance(tracking_uri, str) or not tracking_uri.strip()):
            raise bad_value("MLflowLogger: tracking_uri", tracking_uri, "use http(s)://host:port, sqlite:///path or file:/path")
        if not isinstance(experiment_name, str) or not experiment_name:
            raise bad_value("MLflowLogger: experiment_name", experiment_name, "use a non-empty name")
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.tags = dict(tags or {})
        self._client: MlflowClient | None = None
        self.run_id: str | None = None

    def resolved_uri(self, run_dir: Path) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        return f"sqlite:///{(Path(run_dir).parent / 'mlflow.db').absolute()}"

    def check(self, run_dir: Path) -> None:
        self._import("mlflow")
        uri = self.resolved_uri(run_dir)
        scheme = urlparse(uri).scheme
        if scheme in ("http", "https"):
            self._probe(uri)
        elif scheme in ("sqlite", "file", ""):
            from mlflow import environment_variables

            allowed = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
            if scheme != "sqlite" and allowed is not None and not allowed.get():
                raise bad_value("MLflowLogger: tracking_uri", uri, "MLflow 3 refuses file stores: use "
                                "sqlite:///<folder>/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)")
            path = _local_path(uri)
            if path is not None:
                _check_writable(path.parent if scheme == "sqlite" else path, f"MLflowLogger: tracking_uri={uri!r}")
        else:
            from mlflow.tracking._tracking_service.utils import _tracking_store_registry

            try:
                _tracking_store_registry.get_store_builder(uri)
            except Exception:
                raise bad_value("MLflowLogger: tracking_uri", uri, "use http(s)://host:port, sqlite:///path or "
                                "file:/path (or a scheme of an installed MLflow plugin)") from None

    def _probe(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        try:
            with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
                MlflowClient(uri).get_experiment_by_name(self.experiment_name)
        except Exception as err:
            if type(err).__name__ == "RestException":  # it answered: credentials, permissions, a proxy
                raise ConfigError(f"MLflowLogger: tracking_uri={uri!r} refused the request ({_short(err)}): "
                                  "check MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME") from None
            raise ConfigError(f"MLflowLogger: tracking_uri={uri!r} does not answer as an MLflow server "
                              f"({_short(err)}): start `mlflow server` there or fix the URI") from None

    def start(self, run_dir: Path, params: dict[str, Any], resume_step: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = self.resolved_uri(run_dir)
        client = MlflowClient(uri)
        state = Path(run_dir) / "mlflow_run.json"
        saved = _read_json(state) if resume_step > 0 else {}
        run_id, logged = None, {}
        if saved.get("tracking_uri") == uri and saved.get("run_id"):
            try:
                found = client.get_run(saved["run_id"])
                if found.info.lifecycle_stage == "active":
                    run_id, logged = found.info.run_id, dict(found.data.params)
            except Exception as err:  # deleted or another store: a new run
                log.warning("mlflow: run %s from %s is gone (%s); starting a new run", saved["run_id"], state,
                            _short(err))
        if run_id is None:
            experiment_id = self._experiment_id(client, uri, run_dir)
            tags = {"nemo_automodel.run_dir": str(Path(run_dir).absolute()), **self.tags}
            run_id = client.create_run(experiment_id, run_name=self.run_name or Path(run_dir).name,
                                       tags=tags).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "nemo_automodel.resumed_from_step", str(resume_step))
        values = {k: _param_value(v) for k, v in params.items()}
        changed = sorted(k for k, v in values.items() if k in logged and logged[k] != v)
        if changed:  # MLflow params are immutable: keep the first value, say so
            log.warning("mlflow: run %s keeps its first values of %s (changed on resume)", run_id, ", ".join(changed))
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=new[i:i + 100])
        self._client, self.run_id = client, run_id
        _write_json(state, {"tracking_uri": uri, "run_id": run_id, "experiment_name": self.experiment_name})

    def _experiment_id(self, client: MlflowClient, uri: str, run_dir: Path) -> str:
        found = client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        location = None
        if urlparse(uri).scheme == "sqlite":  # else MLflow puts artifacts under the current directory
            db = _local_path(uri)  # None: an in-memory database, whose artifacts go where the default's do
            folder = db.parent if db is not None else Path(run_dir).parent
            location = (folder / "mlartifacts").absolute().as_uri()
        try:
            return client.create_experiment(self.experiment_name, artifact_location=location)
        except Exception:  # created meanwhile by a parallel task
            found = client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        if self._client is None or self.run_id is None:
            raise RuntimeError("MLflowLogger.log before start (or after finish)")
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, plot: Path | None, status: str) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        run_id = cast(str, self.run_id)  # set by start, with the client
        try:
            if plot is not None and Path(plot).is_file():
                client.log_artifact(run_id, str(plot))
        finally:
            client.set_terminated(run_id, status=status)


# -- used by the trainer --------------------------------------------------------------------------
def check_trackers(trackers: list[Tracker], run_dir: Path) -> None:
    """Each tracker's cheap checks, on the launching process and rank 0 (before anything loads)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for tracker in trackers:
        tracker.check(run_dir)


def _next_second_after_attempts(wandb_dir: Path, run_id: str) -> None:
    """W&B names an offline attempt's folder ``offline-run-<local time to the second>-<id>``: a resume within
    the second of an earlier attempt would write into its folder and replace its records. Wait (< 1 s) for a
    second of its own."""
    def stamp() -> str:
        return datetime.now().strftime("%Y%m%d_%H%M%S")

    while (wandb_dir / f"offline-run-{stamp()}-{run_id}").exists():
        time.sleep(0.05)


def start_trackers(trackers: list[Tracker], run_dir: Path, params: dict[str, Any], resume_step: int) -> list[Tracker]:
    """Start each tracker; a failure ends those already started and is a one-line ConfigError."""
    started: list[Tracker] = []
    for tracker in trackers:
        try:
            tracker.start(run_dir, params, resume_step)
        except Exception as err:
            for done in started:
                with _quiet():
                    done.finish(None, "FAILED")
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{type(tracker).__name__} could not start: {_short(err)} "
                              f"(check its arguments; the package comes with {EXTRA})") from None
        started.append(tracker)
    return started


def object_params(trainer: Any, model: TrainableModel, peft: PeftMethod | None, data: DataModule,
                  optim: OptimizerModule | None) -> dict[str, Any]:
    """The params a plain-Python run records, under the keys a recipe graph would use (``trainer.max_steps``,
    ``peft.dim``, ``optim.optimizer_fn.lr``…): each object's constructor arguments (`constructor_args`)
    read back from its attribute of the same name, where that value is plain."""
    out: dict[str, Any] = {}

    def put(prefix: str, obj: Any) -> None:
        out[prefix + "._target_"] = None if obj is None else _qualname(type(obj))
        attributes = getattr(obj, "__dict__", {})  # what the constructor stored: no property runs
        for name in constructor_args(type(obj)):
            value = attributes.get(name)
            if value is not None and _plain(value):
                out[f"{prefix}.{name}"] = list(value) if isinstance(value, tuple) else value

    put("trainer", trainer)
    out["trainer.strategy"] = getattr(getattr(trainer, "strategy", None), "name", None)
    put("model", model)
    put("data", data)
    if peft is not None:
        put("peft", peft)
    else:
        out["peft"] = None
    if optim is not None:
        put("optim", optim)
        fn: Any = getattr(optim, "optimizer_fn", None)
        if hasattr(fn, "func") and hasattr(fn, "keywords"):  # functools.partial(torch.optim.AdamW, lr=...)
            out["optim.optimizer_fn._target_"] = _qualname(fn.func)
            for key, value in fn.keywords.items():
                if _plain(value):
                    out[f"optim.optimizer_fn.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def constructor_args(cls: type) -> list[str]:
    """The named ``__init__`` arguments of ``cls`` and of its bases (a subclass that passes ``**kwargs`` on
    keeps its base's), in order; ``*args``/``**kwargs`` themselves are not names."""
    names: dict[str, None] = {}
    for klass in cls.__mro__[:-1]:  # not object
        init = vars(klass).get("__init__")
        try:
            params = inspect.signature(init).parameters.values() if init is not None else ()
        except (TypeError, ValueError):  # a C-level __init__
            continue
        names.update((p.name, None) for p in params
                     if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return list(names)


# -- helpers --------------------------------------------------------------------------------------
def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _plain(value: Any) -> bool:
    if isinstance(value, (str, int, float, bool)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if _plain(value) or value is None else str(value)
    return text[:PARAM_VALUE_MAX]


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err)}"[:300]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _local_path(uri: str) -> Path | None:
    """The filesystem path of a ``sqlite:///…``, ``file:…`` or plain-path URI (None: in-memory sqlite)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        rest = uri.split("?", 1)[0][len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        return Path(rest) if rest and rest != ":memory:" else None
    if parsed.scheme == "file":
        return Path(parsed.path)
    return Path(uri)


def _check_writable(path: Path, what: str) -> None:
    """``path`` exists as a writable folder, or its nearest existing ancestor is one (it will be created)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"{what} is not usable: {probe} is not a writable folder")


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _quiet() -> Iterator[None]:
    try:
        yield
    except Exception as err:  # ending a tracker must never hide the error that ended the run
        log.warning("tracker: %s", _short(err))
