"""``precision="auto"`` (the default): the choice for each kind of hardware, from its capabilities, what a CPU run
prints at setup, an explicit precision winning, and the planner planning the same choice."""

from __future__ import annotations

import fiddle as fdl
import pytest

from nemo_automodel import lightning as nl
from nemo_automodel import llm
from nemo_automodel.trainer.precision import Hardware, choose_precision, cpu_bf16_flags, detect
from tests.helpers import chat_dataset

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\nprocessor\t: 1\nflags\t\t: fpu avx2\n"


@pytest.mark.parametrize("hardware, peft, expected", [
    (Hardware("cuda", True, "NVIDIA H100"), True, ("bf16-true", "CUDA (NVIDIA H100), bf16 supported, LoRA")),
    (Hardware("cuda", True, "NVIDIA H100"), False, ("bf16-mixed", "CUDA (NVIDIA H100), bf16 supported, full fine-tuning")),
    (Hardware("cuda", False, "Tesla V100"), True, ("32", "CUDA (Tesla V100) without bf16 support")),
    (Hardware("cpu", True, "avx512_bf16"), True, ("bf16-mixed", "CPU with native bf16 (avx512_bf16)")),
    (Hardware("cpu", True, "amx_bf16"), False, ("bf16-mixed", "CPU with native bf16 (amx_bf16)")),
    (Hardware("cpu", False, "no avx512_bf16/amx_bf16"), True,
     ("32", "CPU without native bf16 (no avx512_bf16/amx_bf16): bf16 would be emulated")),
])
def test_the_choice_for_each_kind_of_hardware(hardware, peft, expected):
    assert choose_precision(hardware, peft) == expected


def test_a_strategy_without_cpu_autocast_keeps_fp32():
    assert choose_precision(Hardware("cpu", True, "avx512_bf16"), peft=True, cpu_autocast=False)[0] == "32"
    assert choose_precision(Hardware("cuda", True, "NVIDIA H100"), peft=True, cpu_autocast=False)[0] == "bf16-true"


def test_the_cpu_flags_are_read_from_cpuinfo():
    assert cpu_bf16_flags(CPUINFO) == ["avx512_bf16"]
    assert cpu_bf16_flags("flags : fpu avx2\n") == []


def _fit(tiny_llama, tmp_path, **trainer_kw) -> nl.Trainer:
    trainer = nl.Trainer(max_steps=1, enable_progress_bar=False, **trainer_kw)
    llm.api.finetune(model=llm.HFAutoModelForCausalLM(str(tiny_llama)), peft=llm.peft.LoRA(dim=4),
                     data=llm.HFDatasetDataModule(chat_dataset(), formatting="chat", seq_length=64,
                                                  micro_batch_size=2, global_batch_size=2),
                     optim=fdl.build(llm.adam.pytorch_adam_with_flat_lr(lr=1e-3)), trainer=trainer,
                     log=nl.NeMoLogger(log_dir=str(tmp_path), name="run"))
    return trainer


def test_auto_is_decided_at_setup_and_said_once_and_an_explicit_value_wins(tiny_llama, tmp_path, capfd):
    import torch

    expected, reason = choose_precision(detect(torch.device("cpu")), peft=True)
    trainer = _fit(tiny_llama, tmp_path / "auto")
    assert trainer.precision == expected
    assert capfd.readouterr().out.count(f"precision auto -> {expected} ({reason})") == 1
    assert (trainer.autocast_dtype is torch.bfloat16) == (expected == "bf16-mixed")
    trainer = _fit(tiny_llama, tmp_path / "explicit", precision="32")
    assert trainer.precision == "32" and trainer.autocast_dtype is None
    assert "precision auto" not in capfd.readouterr().out


def test_the_planner_plans_the_trainers_choice(tiny_llama):
    from nemo_automodel.launch.plan_recipe import job_from_recipe
    from recipes.hf_auto_model_for_causal_lm import finetune_recipe

    lora, full = finetune_recipe(model_id=str(tiny_llama)), finetune_recipe(model_id=str(tiny_llama), peft_scheme=None)
    assert job_from_recipe(lora, device="cuda").precision == "bf16-true"
    assert job_from_recipe(full, device="cuda").precision == "bf16-mixed"
    lora.trainer.precision = "32"
    assert job_from_recipe(lora, device="cuda").precision == "32"
