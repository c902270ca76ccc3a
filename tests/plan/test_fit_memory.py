"""``Trainer(fit_memory=...)``: the budget's parsing, the changes the planner chooses at a budget (meta device only),
what it leaves to the user, the dry run, and real CPU training under two budgets on two architectures whose
measured peak (``RssAnon`` growth over the whole ``finetune``, ``fit_run.py``) stays under the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import pytest
import transformers

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.errors import ConfigError
from nemo_automodel.peft import LoRA
from nemo_automodel.plan import TrainingJob, estimate
from nemo_automodel.plan.fit import (
    CPU_PROCESS_RESERVE,
    RESERVE,
    cgroup_room,
    fit_job,
    free_memory,
    mem_available,
    parse_fit_memory,
)
from nemo_automodel.plan.recommend import recommend
from tests.helpers import chat_dataset
from tests.plan import fit_run
from tests.plan.test_plan import _plan_table_configs

ROOT = Path(__file__).resolve().parents[2]
GIB, MIB = 1 << 30, 1 << 20


# -- the budget -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("80GiB", 80 * GIB), ("1.5GiB", int(1.5 * GIB)), ("512MiB", 512 * MIB),
                                            ("auto", "auto"), (None, None)])
def test_budget_sizes(text, expected):
    assert parse_fit_memory(text) == expected


@pytest.mark.parametrize("value", ["80", 80, 1.5, "80XB", "lots", "-1GiB", "0MiB", True, ""])
def test_a_bad_budget_is_one_line_at_construction(value):
    with pytest.raises(ConfigError, match=r"fit_memory=.* is invalid: use None, 'auto' .* '512MiB'") as err:
        nl.Trainer(max_steps=1, fit_memory=value)
    assert "\n" not in str(err.value)


def test_auto_reads_meminfo_capped_by_the_cgroup_and_shared_by_the_nodes_processes(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert mem_available(meminfo) == 20000000 * 1024
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("100\n")
    assert cgroup_room(tmp_path / "v1") is None
    (v1 / "memory.limit_in_bytes").write_text(f"{4 * GIB}\n")
    assert cgroup_room(tmp_path / "v1") == 4 * GIB - 100
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_room(v2) is None
    (v2 / "memory.max").write_text(f"{GIB}\n")
    (v2 / "memory.current").write_text(f"{GIB // 4}\n")
    assert cgroup_room(v2) == GIB - GIB // 4

    import torch

    from nemo_automodel.plan import fit

    monkeypatch.setattr(fit, "mem_available", lambda: 8 * GIB)
    monkeypatch.setattr(fit, "cgroup_room", lambda: 6 * GIB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert free_memory(torch.device("cpu")) == (3 * GIB, "the cgroup's memory limit less its usage / 2 processes "
                                                         "on this node")


# -- the changes at a budget (meta device) -----------------------------------------------------------
def _tiny_job(arch: str = "llama") -> TrainingJob:
    """`fit_run`'s job as the real runs configure it (full fine-tuning, fp32, 4 x 512 tokens, global batch 4)."""
    return TrainingJob(fit_run.config(arch), precision="32", device="cpu", micro_batch_size=fit_run.MICRO,
                       seq_length=fit_run.SEQ, accumulate=fit_run.GLOBAL // fit_run.MICRO)


CHUNKED, MICRO_1, CHECKPOINTING = "model.chunked_loss=True", "data.micro_batch_size=1", "model.activation_checkpointing=True"
# (architecture, budget as a fraction of the estimate as configured, the changes fit_memory makes)
BUDGETS = [("llama", 1.6, []), ("llama", 0.75, [CHUNKED]), ("llama", 0.5, [CHUNKED, MICRO_1, CHECKPOINTING]),
           ("qwen3_moe", 0.75, [CHUNKED]), ("qwen3_moe", 0.6, [CHUNKED, MICRO_1])]


@pytest.mark.parametrize("arch, fraction, expected", BUDGETS)
def test_the_cheapest_changes_that_fit_a_budget(arch, fraction, expected):
    job = _tiny_job(arch)
    default = estimate(job).total
    budget = int(default * fraction)
    fitting = fit_job(job, budget, precision_adjustable=False)
    assert [c.override for c in fitting.changes] == expected
    final = fitting.after or fitting.before
    assert final.total <= budget * (1 - RESERVE) - CPU_PROCESS_RESERVE
    assert final.job.micro_batch_size * final.job.accumulate == fit_run.GLOBAL  # the same global batch
    kept = "5% and 64.0 MiB for the process"
    if expected:
        lines = fitting.lines()
        assert lines[0] == (f"fit_memory: budget {budget / MIB:.1f} MiB per process; estimated peak {default / MIB:.1f} "
                            "MiB as configured, changing:")
        assert [ln.split()[1] for ln in lines[1:-1]] == expected
        assert lines[-1].startswith("fit_memory: estimated peak now ") and lines[-1].endswith(f"(the budget less {kept})")
    else:
        assert fitting.lines() == [f"fit_memory: budget {budget / MIB:.1f} MiB per process; the job fits as "
                                   f"configured (estimated peak {default / MIB:.1f} MiB, {kept} kept free)"]


def test_when_nothing_it_may_change_fits_one_line_names_what_would():
    job = _tiny_job()
    with pytest.raises(ConfigError) as err:
        fit_job(job, int(estimate(job).total * 0.4), precision_adjustable=False)
    text = str(err.value)
    assert "\n" not in text and text.startswith("fit_memory=") and " even with " in text
    assert "use >= 3 processes with FSDP2 (trainer.devices=3 trainer.strategy=fsdp2) or LoRA/QLoRA" in text
    with pytest.raises(ConfigError, match="fit_memory=4.0 MiB is no more than the 5% and 64.0 MiB for the process it "
                                          "keeps free") as err:
        fit_job(job, 4 * MIB)
    assert "\n" not in str(err.value)


def test_llama_3_8b_lora_in_fp32_at_80gib_is_offered_bf16_first():
    """The first user's job: LoRA of a Llama-3-8B shape loaded in fp32 at 4 x 4096 tokens. The planner's cheapest
    fix was micro batch 1 alone (1.5 GiB to spare); bf16-true is faster on a GPU, so it comes first and stays."""
    cfg = _plan_table_configs()["Llama-3-8B"][0]
    job = TrainingJob(cfg, peft=LoRA(target_modules=["*_proj"], dim=16, alpha=32), precision="32", seq_length=4096,
                      micro_batch_size=4, accumulate=2)
    advice = recommend(job, 80 * GIB)
    assert [c.override for c in advice.changes] == ["trainer.precision=bf16-true", "data.micro_batch_size=1"]
    assert advice.result.total < 60 * GIB
    # fit_memory leaves an explicit precision as it is; an "auto" one it may change
    fixed = fit_job(job, 80 * GIB, precision_adjustable=False)
    assert [c.override for c in fixed.changes] == ["model.chunked_loss=True", "data.micro_batch_size=1"]
    assert [c.override for c in fit_job(job, 80 * GIB).changes] == [c.override for c in advice.changes]


def test_a_4_bit_base_is_left_to_the_user():
    """LoRA on a model whose decoder layers dominate: only QLoRA's 4-bit base would fit; fit_memory names it."""
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False)
    job = TrainingJob(cfg, peft=LoRA(target_modules=["*_proj"], dim=8), precision="bf16-true", device="cpu",
                      seq_length=128)
    smallest = job.replace(chunked_loss=True, activation_checkpointing=True)
    between = (estimate(smallest).total + estimate(smallest.replace(quantization="nf4")).total) / 2
    with pytest.raises(ConfigError, match="model.quantization=nf4 would fit .*model.quantization=nf4: a 4-bit base "
                                          "\\(QLoRA\\) changes the weights the adapters train against") as err:
        fit_job(job, int((between + CPU_PROCESS_RESERVE) / (1 - RESERVE)), precision_adjustable=False)
    assert "\n" not in str(err.value)


def test_fsdp2_only_when_the_strategy_was_left_to_the_trainer():
    """Full fine-tuning of the Llama-3-8B shape on 8 GPUs: a DDP replica (weights, gradients, AdamW) is 120 GiB."""
    job = TrainingJob(_plan_table_configs()["Llama-3-8B"][0], precision="bf16-mixed", devices=8, seq_length=2048,
                      chunked_loss=True)
    assert [c.override for c in fit_job(job, 80 * GIB).changes] == ["trainer.strategy=fsdp2"]
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp2: the trainer's strategy was given explicitly"):
        fit_job(job, 80 * GIB, strategy_adjustable=False)


# -- the trainer and the dry run ------------------------------------------------------------------
def test_the_trainer_says_the_job_fits_or_stops_before_the_weights_load(tiny_llama, tmp_path, capfd):
    def run(fit_memory: str) -> llm.HFAutoModelForCausalLM:
        model = llm.HFAutoModelForCausalLM(str(tiny_llama))
        llm.api.finetune(model=model, data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64,
                                                                   micro_batch_size=2, global_batch_size=2),
                         optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-3)),
                         trainer=nl.Trainer(max_steps=1, precision="32", fit_memory=fit_memory,
                                            enable_progress_bar=False, enable_checkpointing=False),
                         log=nl.NeMoLogger(log_dir=str(tmp_path), name=fit_memory, tensorboard=False))
        return model

    run("auto")
    out = capfd.readouterr().out
    assert "fit_memory: budget " in out and " per process (MemAvailable" in out and "the job fits as configured" in out
    with pytest.raises(ConfigError, match=r"^fit_memory=80.0 MiB: the job's estimated peak .* does not fit") as err:
        run("80MiB")
    assert "\n" not in str(err.value)


def test_the_dryrun_and_plan_show_what_it_would_change(monkeypatch, capsys, tmp_path):
    from nemo_run.config import set_nemorun_home

    from nemo_automodel.launch.plan_cli import main as plan_main
    from nemo_automodel.launch.plan_recipe import job_from_recipe
    from recipes import hf_auto_model_for_causal_lm as hf_recipe
    from recipes.cli import main, plan_target

    folder = tmp_path / "model"
    fit_run.config("llama").save_pretrained(folder)
    recipe = hf_recipe.finetune_recipe(str(folder), precision="32", seq_length=fit_run.SEQ)
    job = job_from_recipe(recipe)
    budget = estimate(job.replace(chunked_loss=True)).total / (1 - RESERVE) + MIB  # the chunked loss alone fits
    overrides = [f"model.model_id={folder}", "trainer.precision=32", f"data.seq_length={fit_run.SEQ}",
                 f"trainer.fit_memory={budget / MIB:.1f}MiB"]
    set_nemorun_home(str(tmp_path / "nemorun"))
    monkeypatch.setattr(sys, "argv", ["hf_auto_model_for_causal_lm.py", *overrides, "--dryrun"])
    main(hf_recipe.finetune_recipe)
    out = capsys.readouterr().out
    assert "it would change:\nfit_memory:   model.chunked_loss=True " in out
    assert "fit_memory: estimated peak then" in out and "no memory budget given" not in out
    assert plan_main([str(folder), *overrides[1:]], resolve=plan_target) == 0
    assert "it would change:\nfit_memory:   model.chunked_loss=True " in capsys.readouterr().out


# -- real CPU training under a budget ------------------------------------------------------------
REAL = [(arch, fraction, changes) for arch, fraction, changes in BUDGETS if changes]


@pytest.mark.distributed  # one worker process: runs alone under xdist
def test_real_training_under_a_budget_stays_under_it(tmp_path, tokenizer_dir):
    cases = [dict(arch=arch, fraction=fraction) for arch, fraction, _ in REAL]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "plan" / "fit_run.py"), str(tmp_path),
                           str(tokenizer_dir), json.dumps(cases)], capture_output=True, text=True, env=env, timeout=600)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(results) == len(cases), proc.stderr[-3000:]
    rows = ["| arch | default estimate MiB | budget MiB | changes | estimate then MiB | measured peak MiB | of budget |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        changes = " ".join(ln.split()[1] for ln in r["lines"][1:-1])
        rows.append(f"| {r['arch']} | {r['default'] / MIB:.1f} | {r['budget'] / MIB:.1f} | {changes} | "
                    f"{r['lines'][-1].split()[4]} | {r['growth'] / MIB:.1f} | {r['growth'] / r['budget']:.2f} |")
    table = "\n".join(rows)
    print("\n" + table)
    for r, (_, _, changes) in zip(results, REAL):
        assert r["budget"] < r["default"] and [ln.split()[1] for ln in r["lines"][1:-1]] == changes, table
        assert r["micro_batch_size"] == (1 if MICRO_1 in changes else fit_run.MICRO), table  # applied to the live job
        assert r["checkpointing"] == (CHECKPOINTING in changes) and r["chunked_loss"], table
        assert r["growth"] < r["budget"], table
        assert len(r["losses"]) == 1 and 0 < r["losses"][0] < 20, r  # it trained, with a finite loss
