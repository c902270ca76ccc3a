"""Damaged checkpoints and full disks: resume from the newest checkpoint that verifies, fail in one line.

The full-disk test runs on a real tmpfs sized to hold one checkpoint and a half (as root), else on an
injected ENOSPC from the trainer-state write.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import fiddle as fdl
import pytest
import torch

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.launch.guard import guard
from tests.helpers import chat_dataset


def _finetune(model_path: Path, log_dir: Path, steps: int, lora: bool = True) -> Path:
    return llm.api.finetune(
        model=llm.HFAutoModelForCausalLM(str(model_path)),
        peft=llm.peft.LoRA(target_modules=["*_proj"], dim=4) if lora else None,
        data=llm.HFDatasetDataModule(chat_dataset(repeat=1), formatting="chat", seq_length=64, micro_batch_size=4,
                                     global_batch_size=4, seed=7),
        optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-3)),
        trainer=nl.Trainer(max_steps=steps, enable_progress_bar=False),
        log=nl.NeMoLogger(log_dir=str(log_dir), name="run", ckpt=nl.ModelCheckpoint(every_n_train_steps=1)),
        resume=nl.AutoResume(resume_if_exists=True))


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


@pytest.fixture(scope="module")
def two_checkpoints(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA run stopped after step 2, with checkpoints step-1 and step-2 (``last``)."""
    root = tmp_path_factory.mktemp("two-ckpts")
    run = _finetune(tiny_llama, root, steps=2)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000001", "step-000002"]
    assert (ckpts / "last").resolve().name == "step-000002"
    return root


def _shard(ckpt: Path) -> Path:
    return next((ckpt / "state").glob("*.distcp"))


def _scramble(path: Path) -> None:  # same size, other bytes
    path.write_bytes(os.urandom(path.stat().st_size))


DAMAGE = {
    "shard-random-bytes": (lambda c: _scramble(_shard(c)), r"state/__\d+_\d+\.distcp does not match its checksum"),
    "shard-truncated": (lambda c: _shard(c).write_bytes(_shard(c).read_bytes()[:100]), r"distcp has 100 bytes"),
    "trainer-state-missing": (lambda c: (c / "trainer-rank0.pt").unlink(), "trainer-rank0.pt is missing"),
    "meta-garbage": (lambda c: (c / "meta.json").write_text("{not json"), r"meta.json is unreadable"),
    "adapter-missing": (lambda c: (c / "hf_adapter" / "adapter_model.safetensors").unlink(),
                        "hf_adapter/adapter_model.safetensors is missing"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage, named", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_last_falls_back_to_the_newest_checkpoint_that_verifies(tiny_llama, two_checkpoints, tmp_path,
                                                                          caplog, damage, named):
    root = tmp_path / "copy"
    shutil.copytree(two_checkpoints, root, symlinks=True)
    ckpts = root / "run" / "checkpoints"
    damage(ckpts / "step-000002")
    with caplog.at_level(logging.WARNING, logger="nemo_automodel.checkpoint.save_load"):
        _finetune(tiny_llama, root, steps=3)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "step-000002" in warnings[0], warnings
    assert re.search(named, warnings[0]), warnings[0]
    last = (ckpts / "last").resolve()
    assert last.name == "step-000003" and _meta(last)["resumed_from"] == 1  # started at step 2, not 3 or 1


@pytest.mark.slow
def test_no_checkpoint_verifies_is_one_line_naming_the_damage(tiny_llama, two_checkpoints, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(two_checkpoints, root, symlinks=True)
    ckpts = root / "run" / "checkpoints"
    (ckpts / "step-000002" / "trainer-rank0.pt").unlink()
    _scramble(_shard(ckpts / "step-000001"))
    with pytest.raises(SystemExit) as exit_:
        guard(_finetune)(tiny_llama, root, 3)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no checkpoint in") and "step-000002: trainer-rank0.pt is missing" in err[-1] \
        and "step-000001: state/" in err[-1] and "Traceback" not in "".join(err), err


def test_checkpoint_meta_records_every_file(two_checkpoints):
    ckpt = two_checkpoints / "run" / "checkpoints" / "step-000002"
    files = _meta(ckpt)["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json"}
    assert set(files) == on_disk and "trainer-rank0.pt" in files and all(len(f["sha256"]) == 64 for f in files.values())


# -- a full disk ---------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """``(folder, resize(bytes))``: a real tmpfs as root, else a plain folder and ``None``."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512M", "tmpfs", str(mnt)]).returncode:
        yield mnt, None
        return

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow
def test_full_disk_during_save_keeps_the_previous_checkpoint(tiny_llama, small_disk, monkeypatch, capsys):
    disk, resize = small_disk
    _finetune(tiny_llama, disk, steps=1, lora=False)  # full SFT: about 50 MB a checkpoint
    ckpts = disk / "run" / "checkpoints"
    if resize is not None:
        used = sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())
        ckpt = sum(p.stat().st_size for p in (ckpts / "step-000001").rglob("*") if p.is_file())
        resize(used + ckpt // 2)  # room for half of the next checkpoint
    else:  # not root: the trainer-state write of step 2 fails as a full disk would
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith("trainer-rank0.pt") and "step-000002" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as exit_:
        guard(_finetune)(tiny_llama, disk, 2, lora=False)
    assert exit_.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint step 2 could not be written (No space left on device: "), line
    assert str(ckpts / ".tmp-step-000002") in line and "checkpoint step 1" in line and "is kept" in line, line
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step-000001"]  # the partial folder is gone
    if resize is not None:
        resize(512 * 2**20)
    monkeypatch.undo()
    _finetune(tiny_llama, disk, steps=2, lora=False)  # the next run resumes from step 1
    assert _meta((ckpts / "last").resolve())["resumed_from"] == 1
