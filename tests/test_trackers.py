"""Experiment trackers: MLflow (a real ``mlflow server``, and a sqlite store) and W&B offline, read back.

Every run is a recipe graph launched with ``run_graph`` (so the params come from the graph), on a
tiny random model. What the trackers hold is compared with metrics.jsonl and loss.png of the run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nemo_run as run
import pytest
import torch

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.launch.experiment import Experiment
from nemo_automodel.launch.guard import run_graph
from nemo_automodel.launch.tracker_params import flatten_graph, with_tracker_params
from nemo_automodel.tracking.trackers import EXTRA, MLflowLogger, WandbLogger
from nemo_automodel.trainer.precision import choose_precision, detect
from recipes import hf_auto_model_for_causal_lm as hf_recipe
from tests.helpers import chat_dataset, metrics, require_module

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(autouse=True)
def _hermetic_wandb(tmp_path, monkeypatch):
    """W&B keeps its settings, cache and data under tmp_path, and any network use would fail."""
    for var, sub in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat_file(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(model_dir: Path, tmp_path: Path, name: str = "tracked", max_steps: int = STEPS, mlflow=None, wandb=None):
    """The finetune recipe on a tiny model, LoRA dim 8 (not the recipe's default 16), with trackers on ``log``."""
    recipe = hf_recipe.finetune_recipe(model_id=str(model_dir), dataset=str(_chat_file(tmp_path / "chat.jsonl")),
                                       formatting="chat", dir=str(tmp_path / "runs"), name=name, max_steps=max_steps,
                                       seq_length=64, micro_batch_size=2, global_batch_size=4)
    recipe.peft.dim = 8
    recipe.trainer.enable_progress_bar = False
    recipe.log.ckpt.every_n_train_steps = 1
    if mlflow is not None:
        recipe.log.mlflow = run.Config(MLflowLogger, **mlflow)
    if wandb is not None:
        recipe.log.wandb = run.Config(WandbLogger, **wandb)
    return recipe


def _rows(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in metrics(run_dir) if key in r]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _check_mlflow_run(client, run_dir: Path, recipe, experiment: str) -> str:
    """One FINISHED run in the experiment: graph params, every metrics.jsonl row, loss.png; returns its id."""
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    run_id = found.info.run_id
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    assert found.info.status == "FINISHED" and found.info.run_name == run_dir.name
    params = found.data.params
    assert params["peft.dim"] == "8" and params["trainer.max_steps"] == str(STEPS)
    assert params["model.model_id"] == str(recipe.model.model_id)
    assert params["optim.optimizer_fn.lr"] == json.dumps(recipe.optim.optimizer_fn.lr)
    assert params["peft.target_modules"] == json.dumps(list(recipe.peft.target_modules))
    assert params["peft._target_"] == "nemo_automodel.peft.lora.LoRA"
    assert not any(k.startswith(("log.mlflow", "log.params")) for k in params)
    # keys only the graph has (the built objects do not know them): the params came from the graph
    assert params["log.ckpt.every_n_train_steps"] == "1" and params["resume.resume_if_exists"] == "true"
    assert len(params) > 40  # every argument of every node, defaults included
    for key in ("train_loss", "lr", "loss_tokens"):
        rows = _rows(run_dir, key)
        assert [s for s, _ in rows] == list(range(1, STEPS + 1))
        assert _history(client, run_id, key) == [(s, float(v)) for s, v in rows], key  # float64 both sides
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert artifacts == ["loss.png"]
    local = client.download_artifacts(run_id, "loss.png", str(run_dir.parent / f"download-{run_id}"))
    assert Path(local).read_bytes() == (run_dir / "loss.png").read_bytes()
    return run_id


# -- MLflow ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables takes seconds); each test has its own experiment."""
    require_module("mlflow", f"the trackers extra ({EXTRA})")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite') / 'store' / 'mlflow.db'}"
    (Path(uri[len("sqlite:///"):]).parent).mkdir()
    MlflowClient(uri).search_experiments()  # creates the tables
    return uri


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on a free localhost port: sqlite backend store, local artifacts folder."""
    require_module("mlflow", f"the trackers extra ({EXTRA})")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'store.db'}", "--artifacts-destination", str(root / "artifacts")]
    log_file = (root / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # slow to start on a busy 2-core machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer in 240 s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "root": root}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


@pytest.mark.slow
def test_mlflow_server_round_trip(mlflow_server, tiny_llama, tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = _recipe(tiny_llama, tmp_path, mlflow=dict(tracking_uri=mlflow_server["url"], experiment_name="server"))
    run_dir = run_graph(recipe)
    run_id = _check_mlflow_run(MlflowClient(mlflow_server["url"]), run_dir, recipe, "server")
    # the artifact went through the server's proxy into its artifacts folder, not next to the run
    stored = list((mlflow_server["root"] / "artifacts").rglob("loss.png"))
    assert len(stored) == 1 and run_id in stored[0].parts


def test_mlflow_sqlite_store_round_trip(sqlite_store, tiny_llama, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    recipe = _recipe(tiny_llama, tmp_path, mlflow=dict(tracking_uri=sqlite_store, experiment_name="sqlite"))
    run_dir = run_graph(recipe)
    run_id = _check_mlflow_run(MlflowClient(sqlite_store), run_dir, recipe, "sqlite")
    artifacts = Path(sqlite_store[len("sqlite:///"):]).parent / "mlartifacts"  # beside the store, not in the cwd
    assert list(cwd.iterdir()) == []
    stored = [p for p in artifacts.rglob("loss.png") if run_id in p.parts]
    assert len(stored) == 1 and stored[0].read_bytes() == (run_dir / "loss.png").read_bytes()


class _DeleteRunAt:
    """A trainer callback that deletes the MLflow run under the trainer at ``step``: later logging fails."""

    def __init__(self, step: int, uri: str) -> None:
        self.step, self.uri = step, uri

    def on_train_step_end(self, trainer, step, step_metrics):
        if step == self.step:
            from mlflow.tracking import MlflowClient

            run_id = json.loads((trainer.run_dir / "mlflow_run.json").read_text())["run_id"]
            MlflowClient(self.uri).delete_run(run_id)


def test_mlflow_failure_mid_run_warns_once_and_the_run_finishes(sqlite_store, tiny_llama, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    uri = sqlite_store
    recipe = _recipe(tiny_llama, tmp_path, mlflow=dict(tracking_uri=uri, experiment_name="mid-run"))
    recipe.trainer.callbacks = [_DeleteRunAt(2, uri)]
    with caplog.at_level(logging.WARNING, logger="nemo_automodel.tracking.metrics"):
        run_dir = run_graph(recipe)
    assert [s for s, _ in _rows(run_dir, "train_loss")] == list(range(1, STEPS + 1))  # training finished
    assert (run_dir / "checkpoints" / "last" / "meta.json").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.name == "nemo_automodel.tracking.metrics"]
    assert len(warnings) == 1 and warnings[0].startswith("mlflow failed") and "active" in warnings[0], warnings
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert _history(MlflowClient(uri), run_id, "train_loss") == _rows(run_dir, "train_loss")[:2]


# -- W&B offline ----------------------------------------------------------------------------------
def _wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: a ``:W&B`` header, then LevelDB-log blocks of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, out, pos, block, pending = path.read_bytes(), [], 7, 32768, b""
    assert raw[:4] == b":W&B", raw[:7]
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending + data)
            out.append(record)
            pending = b""
        elif kind in (2, 3):  # FIRST, MIDDLE
            pending += data
    return out


def _wandb_offline_runs(run_dir: Path, run_id: str) -> list[dict]:
    """Per offline-run folder (oldest first): config, history rows, exit code, folder."""
    runs = []
    for folder in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}")):
        config, history, exit_code = {}, [], None
        for record in _wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":  # an image is several items: nested_key ["loss_curve", "path"], …
                row: dict = {}
                for item in record.history.item:
                    *parents, leaf = list(item.nested_key) or [item.key]
                    node = row
                    for key in parents:
                        node = node.setdefault(key, {})
                    node[leaf] = json.loads(item.value_json)
                history.append(row)
            elif kind == "exit":
                exit_code = record.exit.exit_code
        runs.append({"config": config, "history": history, "exit_code": exit_code, "folder": folder})
    return runs


def _wandb_series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["trainer/global_step"], row[key]) for row in history if key in row]


def test_wandb_offline_run_folder_holds_config_history_and_plot(tiny_llama, tmp_path):
    require_module("wandb", f"the trackers extra ({EXTRA})")
    recipe = _recipe(tiny_llama, tmp_path, wandb=dict(project="tests"))
    run_dir = run_graph(recipe)
    state = json.loads((run_dir / "wandb_run.json").read_text())
    assert state["offline"] is True and state["project"] == "tests"
    (offline,) = _wandb_offline_runs(run_dir, state["id"])
    config = offline["config"]
    assert config["peft.dim"] == 8 and config["trainer.max_steps"] == STEPS
    assert config["model.model_id"] == str(tiny_llama) and config["optim.optimizer_fn.lr"] == recipe.optim.optimizer_fn.lr
    assert config["peft.target_modules"] == list(recipe.peft.target_modules)
    assert config["log.ckpt.every_n_train_steps"] == 1 and config["resume.resume_if_exists"] is True  # graph-only
    for key in ("train_loss", "lr", "loss_tokens"):
        assert _wandb_series(offline["history"], key) == _rows(run_dir, key), key
    (plot_row,) = [row for row in offline["history"] if "loss_curve" in row]
    assert plot_row["trainer/global_step"] == STEPS
    image = offline["folder"] / "files" / plot_row["loss_curve"]["path"]
    assert image.read_bytes() == (run_dir / "loss.png").read_bytes()
    assert offline["exit_code"] == 0


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_continues_the_same_tracker_runs(sqlite_store, tiny_llama, tmp_path):
    """2 steps, then the same job with max_steps=4 resumes from step 2: one MLflow run with steps 1-4,
    and a second W&B offline folder of the same run id with steps 3-4."""
    require_module("wandb", f"the trackers extra ({EXTRA})")
    from mlflow.tracking import MlflowClient

    uri = sqlite_store
    trackers = dict(mlflow=dict(tracking_uri=uri, experiment_name="resume"), wandb=dict(project="tests"))
    run_dir = run_graph(_recipe(tiny_llama, tmp_path, max_steps=2, **trackers))
    first = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    wandb_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    run_graph(_recipe(tiny_llama, tmp_path, max_steps=4, **trackers))

    client = MlflowClient(uri)
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == first
    (found,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert found.info.run_id == first and found.info.status == "FINISHED"
    assert found.data.tags["nemo_automodel.resumed_from_step"] == "2"
    assert found.data.params["trainer.max_steps"] == "2"  # params are immutable in MLflow: the first value stays
    assert _history(client, first, "train_loss") == _rows(run_dir, "train_loss")
    assert [s for s, _ in _rows(run_dir, "train_loss")] == [1, 2, 3, 4]

    assert json.loads((run_dir / "wandb_run.json").read_text())["id"] == wandb_id
    runs = _wandb_offline_runs(run_dir, wandb_id)
    assert len(runs) == 2 and [r["exit_code"] for r in runs] == [0, 0]
    rows = _rows(run_dir, "train_loss")
    assert _wandb_series(runs[0]["history"], "train_loss") == rows[:2]
    assert _wandb_series(runs[1]["history"], "train_loss") == rows[2:]
    assert runs[1]["config"]["trainer.max_steps"] == 4


# -- params ---------------------------------------------------------------------------------------
def test_graph_params_are_recorded_only_for_graphs_with_a_tracker(tmp_path):
    plain = _recipe("/not/there", tmp_path)
    assert with_tracker_params(plain) is plain and "params" not in plain.log.__arguments__
    tracked = _recipe("/not/there", tmp_path, mlflow=dict(tracking_uri="http://user:secret@host:5000"))
    tracked.log.params = {"note": "baseline", "peft.dim": "eight"}
    out = with_tracker_params(tracked)
    assert out is not tracked and tracked.log.params == {"note": "baseline", "peft.dim": "eight"}  # a copy
    params = out.log.params
    assert params["note"] == "baseline" and params["peft.dim"] == "eight"  # explicit entries win
    assert params["trainer.max_steps"] == STEPS and params["peft.alpha"] == 32 and params["peft.dropout"] == 0.0
    assert params["data.path_or_dataset"] == str(tmp_path / "chat.jsonl")
    assert params["log.ckpt.every_n_train_steps"] == 1 and params["trainer.seed"] == 1234  # a default
    assert not any("secret" in str(v) for v in params.values()) and "log.mlflow.tracking_uri" not in params
    assert flatten_graph(out)["peft.dim"] == 8  # the graph itself is unchanged

    exp = Experiment("params", executor=run.LocalExecutor())  # what is submitted carries the params too
    exp.add(tracked, name="one")
    assert exp._tasks[0]["task"].log.params["trainer.max_steps"] == STEPS
    assert exp._tasks[0]["task"].log.params["log.log_dir"] == str((tmp_path / "runs").absolute())


def test_plain_python_run_records_object_params(sqlite_store, tiny_llama, tmp_path):
    """No graph: the params are read from the built objects, updated with ``NeMoLogger(params=...)``."""
    import fiddle as fdl
    from mlflow.tracking import MlflowClient

    uri = sqlite_store
    llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(tiny_llama)), peft=llm.peft.LoRA(target_modules=["*_proj"], dim=4),
        data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=3e-3)),
        trainer=nl.Trainer(max_steps=2, enable_progress_bar=False),
        log=nl.NeMoLogger(log_dir=str(tmp_path), name="plain", params={"note": "hand-made"},
                          mlflow=nl.MLflowLogger(tracking_uri=uri, experiment_name="plain")))
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("plain").experiment_id])
    params = found.data.params
    assert params["note"] == "hand-made" and params["peft.dim"] == "4" and params["trainer.max_steps"] == "2"
    chosen, _ = choose_precision(detect(torch.device("cpu")), peft=True)  # "auto", as the trainer decided it
    assert params["trainer.precision"] == chosen and params["trainer.strategy"] == "single"
    assert params["optim.optimizer_fn.lr"] == "0.003" and params["model.model_id"] == str(tiny_llama)
    assert params["data.micro_batch_size"] == "4" and params["peft._target_"] == "nemo_automodel.peft.lora.LoRA"


def test_object_params_are_every_constructor_argument_without_a_list():
    """A constructor argument a class gains is recorded with no list to edit; a subclass that passes
    ``**kwargs`` on keeps its base's arguments; only stored attributes are read (no property runs)."""
    from nemo_automodel.tracking.trackers import object_params

    class ScaledLoRA(llm.peft.LoRA):
        def __init__(self, scale_name: str = "alpha", **kwargs):
            super().__init__(**kwargs)
            self.scale_name = scale_name

        @property
        def dropout_position(self):
            raise AssertionError("a property was read")

    params = object_params(nl.Trainer(max_steps=3, enable_progress_bar=False), llm.HFAutoModelForCausalLM("/m"),
                           ScaledLoRA(scale_name="rs", dim=4, target_modules=("q_proj",)),
                           llm.SquadHFDataModule("org/data", seq_length=64, packed_sequence_size=128), None)
    assert params["peft.scale_name"] == "rs" and params["peft.dim"] == 4 and params["peft.target_modules"] == ["q_proj"]
    assert params["peft._target_"].endswith("ScaledLoRA") and "peft.dropout_position" not in params
    assert params["data.path_or_dataset"] == "org/data" and params["data.formatting"] == "squad"
    assert params["data.packed_sequence_size"] == 128 and params["data.split"] == "train"
    assert params["trainer.max_steps"] == 3 and params["trainer.enable_progress_bar"] is False
    assert params["trainer.strategy"] == "single" and params["model.model_id"] == "/m" and "optim._target_" not in params


# -- bad input ------------------------------------------------------------------------------------
def _plain_finetune(tiny_llama, tmp_path, **log_kw):
    return llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(tiny_llama)), peft=llm.peft.LoRA(target_modules=["*_proj"]),
        data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64, micro_batch_size=4),
        trainer=nl.Trainer(max_steps=1, enable_progress_bar=False),
        log=nl.NeMoLogger(log_dir=str(tmp_path / "runs"), name="bad", **log_kw))


@pytest.mark.parametrize("uri,cause", [
    ("ftp://host/store", "tracking_uri='ftp://host/store' is invalid: use http(s)://host:port"),
    ("file:{tmp}/mlruns", "MLflow 3 refuses file stores: use sqlite:///"),
    ("sqlite:///{tmp}/a-file/mlflow.db", "is not usable: {tmp}/a-file is not a writable folder"),
    ("http://127.0.0.1:{port}", "does not answer as an MLflow server"),
])
def test_bad_tracking_uri_is_one_line_before_anything_loads(uri, cause, tmp_path, monkeypatch):
    require_module("mlflow", f"the trackers extra ({EXTRA})")
    (tmp_path / "a-file").write_text("not a folder")
    fill = dict(tmp=tmp_path, port=_free_port())
    # a model id that cannot load: the tracker check must come first
    with pytest.raises(ConfigError) as err:
        _plain_finetune("/no/such/model", tmp_path, mlflow=nl.MLflowLogger(tracking_uri=uri.format(**fill)))
    message = str(err.value)
    assert "\n" not in message and cause.format(**fill) in message, message
    assert not (tmp_path / "runs").exists()


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    for module, tracker in (("wandb", nl.WandbLogger()), ("mlflow", nl.MLflowLogger())):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(ConfigError) as err:
            _plain_finetune("/no/such/model", tmp_path, **{module: tracker})
        assert str(err.value).startswith(f"{type(tracker).__name__} needs the {module} package")
        assert str(err.value).endswith(EXTRA) and "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_logger_arguments_are_checked():
    with pytest.raises(ConfigError, match="NeMoLogger: wandb='yes' is invalid"):
        nl.NeMoLogger(wandb="yes")
    with pytest.raises(ConfigError, match="NeMoLogger: mlflow="):
        nl.NeMoLogger(mlflow=nl.WandbLogger())
    with pytest.raises(ConfigError, match="WandbLogger: offline='no'"):
        nl.WandbLogger(offline="no")
    with pytest.raises(ConfigError, match="MLflowLogger: tracking_uri=''"):
        nl.MLflowLogger(tracking_uri="")


@pytest.mark.slow
def test_cli_unreachable_server_exits_2_with_one_line_and_writes_nothing(tiny_llama, tmp_path):
    port = _free_port()
    cmd = [sys.executable, str(ROOT / "recipes" / "hf_auto_model_for_causal_lm.py"),
           f"model.model_id={tiny_llama}", f"data.path_or_dataset={_chat_file(tmp_path / 'chat.jsonl')}",
           "data.formatting=chat", f"log.log_dir={tmp_path / 'runs'}", "trainer.max_steps=1",
           f"log.mlflow=mlflow(tracking_uri='http://127.0.0.1:{port}')", "--yes"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MLflowLogger: tracking_uri=") and "does not answer" in last, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_mlflow_default_store_is_beside_the_runs(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "lora"
    assert MLflowLogger().resolved_uri(run_dir) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert MLflowLogger().resolved_uri(run_dir) == "http://tracking:5000"
    assert MLflowLogger(tracking_uri="sqlite:///x.db").resolved_uri(run_dir) == "sqlite:///x.db"


def test_an_in_memory_sqlite_store_starts_and_keeps_the_plot_beside_the_runs(tmp_path, monkeypatch):
    """``sqlite:///:memory:`` has no folder to put artifacts beside (it crashed in start): they go where the
    default store's do, ``<log_dir>/mlartifacts``, never under the current directory."""
    require_module("mlflow", f"the trackers extra ({EXTRA})")
    monkeypatch.chdir(tmp_path)
    run_dir, plot = tmp_path / "runs" / "lora", tmp_path / "loss.png"
    plot.write_bytes(b"png")
    tracker = MLflowLogger(tracking_uri="sqlite:///:memory:")
    tracker.check(run_dir)
    tracker.start(run_dir, {"peft.dim": 8}, 0)
    tracker.log(1, {"train_loss": 2.5})
    client = tracker._client
    tracker.finish(plot, "FINISHED")
    assert client.get_run(tracker.run_id).data.metrics == {"train_loss": 2.5}
    stored = list((tmp_path / "runs" / "mlartifacts").rglob("loss.png"))
    assert len(stored) == 1 and tracker.run_id in stored[0].parts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "runs"]


def test_a_wandb_resume_in_the_second_of_the_last_attempt_waits_for_a_folder_of_its_own(tmp_path):
    """A resume that starts in the same second as the last attempt would share its offline folder (W&B names it
    by the second) and replace its records; the logger waits for the next second first."""
    from datetime import datetime

    from nemo_automodel.tracking.trackers import _next_second_after_attempts

    def stamp():
        return datetime.now().strftime("%Y%m%d_%H%M%S")

    taken = stamp()
    (tmp_path / f"offline-run-{taken}-abc123").mkdir()
    _next_second_after_attempts(tmp_path, "abc123")
    assert stamp() > taken
    _next_second_after_attempts(tmp_path, "other")  # another run's folder never holds it back
