"""The memory planner's arithmetic, its entry points and its one-line errors (fast: meta device only).

The measured accuracy against real training steps is in ``test_plan_vs_measured.py`` (slow).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import transformers

from nemo_automodel.errors import ConfigError
from nemo_automodel.peft import LoRA
from nemo_automodel.plan import TrainingJob, accounting, estimate, parse_memory, plan, plan_memory
from nemo_automodel.plan.accounting import ACTIVATION_ROW, GRADIENTS, LOGITS_ROW, OPTIMIZER, WEIGHTS
from nemo_automodel.plan.recommend import recommend
from tests.conftest import TINY_FAMILIES
from tests.helpers import require_module

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30


def tiny(layers: int = 2, vocab: int = 1024, **kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **kw)


def lora() -> LoRA:
    return LoRA(target_modules=["*_proj"], dim=8)


def n_params(cfg) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())


def decoder_linear_params(cfg) -> int:
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return layers * (h * h * 2 + h * kv * 2 + 3 * h * i)


def adapter_params(cfg, r: int = 8) -> int:
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return layers * sum(r * (a + b) for a, b in shapes)


# -- sizes and units ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("80GiB", 80 * GIB), ("80 GB", 80 * 10**9), ("141G", 141 * 10**9),
                                            ("512MiB", 512 << 20), ("80", 80 * GIB), ("1.5TiB", int(1.5 * 2**40))])
def test_gpu_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80XB", "GiB", "-1GiB", "0GiB", "eighty", "80 GiB extra"])
def test_bad_gpu_memory_is_one_line(text):
    with pytest.raises(ConfigError, match="gpu-memory") as err:
        parse_memory(text)
    assert "\n" not in str(err.value)


# -- the arithmetic -------------------------------------------------------------------------------
def test_fsdp2_over_8_gpus_divides_weights_gradients_and_optimizer_state():
    cfg = tiny()
    single = estimate(TrainingJob(cfg, seq_length=256))
    fsdp = estimate(TrainingJob(cfg, seq_length=256, devices=8, strategy="fsdp2"))
    for part in (WEIGHTS, GRADIENTS, OPTIMIZER):
        assert fsdp.sizes[part] == pytest.approx(single.sizes[part] / 8)
    # what FSDP2 gathers whole (root module, two layers, a layer's gradients) is in the weights row
    assert fsdp.components[WEIGHTS] > fsdp.sizes[WEIGHTS]
    ddp = estimate(TrainingJob(cfg, seq_length=256, devices=8, strategy="ddp"))
    assert ddp.sizes == single.sizes  # a full replica per GPU, plus its gradient buckets
    assert ddp.components[GRADIENTS] >= single.sizes[GRADIENTS]


def test_full_fine_tuning_states_are_two_adam_moments_per_parameter():
    cfg = tiny()
    est = estimate(TrainingJob(cfg, seq_length=128))
    n = n_params(cfg)
    assert est.params == est.trainable == n
    assert est.sizes == {WEIGHTS: 4 * n, GRADIENTS: 4 * n, OPTIMIZER: 8 * n}
    true = estimate(TrainingJob(cfg, seq_length=128, precision="bf16-true"))  # bf16 weights, gradients and AdamW state
    assert true.sizes == {WEIGHTS: 2 * n, GRADIENTS: 2 * n, OPTIMIZER: 4 * n}


def test_lora_has_no_base_gradients_and_keeps_adapters_fp32():
    cfg = tiny()
    n, a = n_params(cfg), adapter_params(cfg)
    est = estimate(TrainingJob(cfg, peft=lora(), seq_length=128))
    assert (est.params, est.trainable) == (n, a)
    assert est.sizes == {WEIGHTS: 4 * (n + a), GRADIENTS: 4 * a, OPTIMIZER: 8 * a}
    true = estimate(TrainingJob(cfg, peft=lora(), seq_length=128, precision="bf16-true"))  # bf16 base, fp32 adapters
    assert true.sizes == {WEIGHTS: 2 * n + 4 * a, GRADIENTS: 4 * a, OPTIMIZER: 8 * a}


def test_qlora_weights_are_about_4_5_bits_per_quantized_weight():
    cfg = tiny()
    n, a, q = n_params(cfg), adapter_params(cfg), decoder_linear_params(cfg)
    for precision, other in (("bf16-true", 2), ("32", 4)):  # embeddings, norms, output layer: the weight dtype
        est = estimate(TrainingJob(cfg, peft=lora(), quantization="nf4", precision=precision, seq_length=128))
        assert est.sizes[WEIGHTS] == pytest.approx(q * 4.5 / 8 + (n - q) * other + 4 * a)
        assert est.sizes[OPTIMIZER] == 8 * a
    double = estimate(TrainingJob(cfg, peft=lora(), quantization={"bnb_4bit_use_double_quant": True}, seq_length=128,
                          precision="bf16-true"))
    assert double.sizes[WEIGHTS] == pytest.approx(q * (4 + 8 / 64 + 32 / 64 / 256) / 8 + (n - q) * 2 + 4 * a)


def test_qlora_activations_are_those_of_a_bf16_base():
    """bitsandbytes' 4-bit matmul keeps no activation for backward, like a frozen bf16 linear layer."""
    cfg = tiny(layers=4)
    bf16 = estimate(TrainingJob(cfg, peft=lora(), precision="bf16-true", seq_length=1024, chunked_loss=True))
    qlora = estimate(TrainingJob(cfg, peft=lora(), precision="bf16-true", quantization="nf4", seq_length=1024,
                         chunked_loss=True))
    assert qlora.components[ACTIVATION_ROW] == pytest.approx(bf16.components[ACTIVATION_ROW], rel=0.05)


def test_the_chunked_loss_removes_the_logits_term():
    from nemo_automodel.models.chunked_ce import auto_chunk_size

    cfg = tiny(vocab=8192)
    tokens_x_vocab = 8192 * 8192 * 4  # fp32 [tokens, vocab]
    plain = estimate(TrainingJob(cfg, seq_length=8192, device="cpu"))
    chunked = estimate(TrainingJob(cfg, seq_length=8192, device="cpu", chunked_loss=True))
    assert plain.components[LOGITS_ROW] >= 3 * tokens_x_vocab  # logits, log-softmax, and their gradients
    # a chunk's logits (the next one is allocated before the last is dropped), and small per-token tensors
    assert chunked.components[LOGITS_ROW] < 2.5 * auto_chunk_size(8192) * 8192 * 4 < 0.2 * tokens_x_vocab


def test_activation_checkpointing_keeps_about_one_input_per_layer():
    cfg = tiny(layers=8)
    off = estimate(TrainingJob(cfg, seq_length=2048, chunked_loss=True))
    on = estimate(TrainingJob(cfg, seq_length=2048, chunked_loss=True, activation_checkpointing=True))
    layer_input = 2048 * cfg.hidden_size * 4
    assert on.components[ACTIVATION_ROW] < off.components[ACTIVATION_ROW] / 3
    assert on.components[ACTIVATION_ROW] > cfg.num_hidden_layers * layer_input


@pytest.mark.parametrize("settings", [dict(), dict(peft="lora", activation_checkpointing=True),
                                      dict(peft="lora", chunked_loss=True, precision="bf16-mixed"),
                                      dict(packed=True, device="cpu", precision="bf16-true"),
                                      dict(devices=4, strategy="fsdp2", precision="bf16-mixed")])
def test_three_rehearsed_layers_extended_equal_rehearsing_all(monkeypatch, settings):
    """Identical layers: the timeline of 3 rehearsed layers, extended to 10, is the one of all 10."""
    settings = dict(settings)
    peft = lora() if settings.pop("peft", None) else None
    job = TrainingJob(tiny(layers=10), peft=peft, seq_length=512, micro_batch_size=2, **settings)
    extended = estimate(job)
    monkeypatch.setattr(accounting, "REHEARSED_LAYERS", 100)
    monkeypatch.setattr(accounting, "_CACHE", {})
    full = estimate(job)
    assert extended.phase == full.phase
    assert extended.components == pytest.approx(full.components, rel=1e-9)


# -- mixture-of-experts and Mamba/hybrid families -------------------------------------------------
@pytest.mark.parametrize("arch", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_moe_and_state_space_families_are_planned(arch, device):
    """Routed experts (grouped_mm), Mamba scans and MLA attention rehearse on meta, LoRA or full."""
    cfg = TINY_FAMILIES[arch](512)
    for peft in (None, LoRA(target_modules=["*_proj"], dim=8)):
        est = estimate(TrainingJob(cfg, peft=peft, seq_length=256, device=device))
        assert est.params == n_params(cfg) and est.components[ACTIVATION_ROW] > 0
        assert (est.trainable < est.params) == (peft is not None)


def _qwen3_moe(top_k: int, experts: int = 4, layers: int = 2) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts,
                                       num_experts_per_tok=top_k, moe_intermediate_size=64)


def test_each_token_counts_once_per_routed_expert():
    """The experts' activations grow with top-k: every (token, expert) pair keeps its own rows."""
    tokens, inter, layers = 1024, 64, 2
    act = {k: estimate(TrainingJob(_qwen3_moe(k), seq_length=tokens, device="cpu", chunked_loss=True))
           .components[ACTIVATION_ROW] for k in (1, 2, 4)}
    per_pair = act[2] - act[1]
    assert act[4] - act[2] == pytest.approx(2 * per_pair, rel=0.01)  # linear in top-k
    # at least the gate/up projection's output [pairs, 2 x inter] and the gated product [pairs, inter], fp32
    assert per_pair >= tokens * layers * 3 * inter * 4


def test_the_router_load_balancing_loss_keeps_every_layers_routing_probabilities():
    tokens, experts, layers = 1024, 64, 2
    cfg = _qwen3_moe(8, experts=experts, layers=layers)
    job = TrainingJob(cfg, seq_length=tokens, device="cpu", chunked_loss=True)
    with_aux, without = estimate(job), estimate(job.replace(router_aux_loss_coef=0.0))
    assert with_aux.total - without.total >= layers * tokens * experts * 4  # fp32 softmax over the router logits
    with pytest.raises(ConfigError, match="router_aux_loss_coef=0.1 is invalid: LlamaConfig has no router"):
        estimate(TrainingJob(tiny(), seq_length=64, router_aux_loss_coef=0.1))


def test_three_rehearsed_moe_layers_extended_come_within_2_percent_of_rehearsing_all(monkeypatch):
    """Identical MoE layers: the load-balancing loss is given all layers' router logits; only the gradient of
    the missing layers' router logits in the lower layers' backward ([tokens, experts] each) is not extended."""
    job = TrainingJob(_qwen3_moe(8, experts=64, layers=7), seq_length=256, device="cpu")
    extended = estimate(job)
    monkeypatch.setattr(accounting, "REHEARSED_LAYERS", 100)
    monkeypatch.setattr(accounting, "_CACHE", {})
    full = estimate(job)
    assert extended.total == pytest.approx(full.total, rel=0.02)
    assert extended.components[ACTIVATION_ROW] == pytest.approx(full.components[ACTIVATION_ROW], rel=0.02)


def test_the_mamba_scan_state_grows_with_the_state_size():
    """SSM layers count their chunked scan (states [chunks, heads, head_dim, state]), not attention."""
    def act(state: int) -> float:
        cfg = transformers.Mamba2Config(vocab_size=512, hidden_size=64, num_heads=8, head_dim=16, state_size=state,
                                        num_hidden_layers=2, n_groups=1, expand=2, chunk_size=64)
        return estimate(TrainingJob(cfg, seq_length=2048, device="cpu", chunked_loss=True)).components[ACTIVATION_ROW]

    tokens, heads, head_dim, layers = 2048, 8, 16, 2
    # B and C ([tokens, state] each, fp32) and the per-chunk states grow with the state size
    assert act(64) - act(16) >= layers * tokens * 2 * (64 - 16) * 4
    assert act(64) - act(16) >= layers * (tokens // 64) * heads * head_dim * (64 - 16) * 4


def test_packed_rows_on_a_state_space_model_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="Mamba2ForCausalLM has state-space .* packed_sequence_size=0") as err:
        estimate(TrainingJob(TINY_FAMILIES["mamba2"](512), seq_length=256, packed=True))
    assert "\n" not in str(err.value)
    assert estimate(TrainingJob(TINY_FAMILIES["qwen3_moe"](512), seq_length=256, packed=True)).total > 0


def _plan_table():
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "benchmarks" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan_table_configs():
    return _plan_table().configs()


def test_published_parameter_counts_of_the_readme_models():
    table = _plan_table()
    for name, (config, published) in table.configs().items():
        est = estimate(TrainingJob(config, peft=lora(), precision="bf16-true", seq_length=64))
        assert table.matches_published(est.params, published), (name, est.params)
    assert table.matches_published(30_532_122_624, "30.5B") and not table.matches_published(30_449_999_999, "30.5B")


# -- recommendations ------------------------------------------------------------------------------
def test_the_cheapest_change_that_fits_is_recommended():
    job = TrainingJob(tiny(vocab=8192), seq_length=2048, device="cpu")
    with_chunked = estimate(job.replace(chunked_loss=True)).total
    advice = recommend(job, with_chunked + (1 << 20))
    assert [c.override for c in advice.changes] == ["model.chunked_loss=True"]
    result = plan(job, with_chunked + (1 << 20))
    assert result.fits is False and "model.chunked_loss=True" in str(result)


def test_nothing_fits_says_why_and_how_many_gpus():
    result = plan(TrainingJob(tiny(), seq_length=256), "1MiB")
    assert result.fits is False and result.advice.result is None
    assert "> 0.0 GiB per GPU" in result.advice.reason or "GPUs with FSDP2" in result.advice.reason
    big = plan(TrainingJob(_plan_table_configs()["Llama-3-70B"][0], seq_length=4096, precision="bf16-mixed"), "80GiB")
    assert "the bf16 weights alone are 131.4 GiB > 80.0 GiB per GPU" in big.advice.reason
    assert "use >= 9 GPUs with FSDP2" in big.advice.reason


# -- bad input: one line each ---------------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: transformers.BartConfig(vocab_size=512, d_model=64, decoder_layers=2, decoder_attention_heads=4,
                                     decoder_ffn_dim=128),  # its decoder calls .item() on a tensor
     "cannot estimate the memory of BartForCausalLM: its training step does not run on the meta device"),
    (lambda: transformers.T5Config(), "cannot estimate the memory of t5: transformers cannot build it as a causal LM"),
])
def test_an_architecture_it_cannot_estimate_is_named_in_one_line(make, match):
    with pytest.raises(ConfigError, match=match) as err:
        estimate(TrainingJob(make(), seq_length=64))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantization="nf4"), "quantization='nf4' needs peft"),
    (dict(quantization="nf4", peft=LoRA(), devices=2, strategy="fsdp2"), "cannot be sharded by strategy='fsdp2'"),
    (dict(quantization="int3", peft=LoRA()), "quantization='int3' is invalid"),
    (dict(tensor_parallel=2), "tensor_parallel=2 x context_parallel=1 must divide devices=1"),
    (dict(precision="fp8"), "precision='fp8' is invalid"),
    (dict(strategy="zero3"), "strategy='zero3' is invalid"),
    (dict(devices=2, strategy="single"), "strategy='single' cannot train on 2 devices"),
    (dict(micro_batch_size=0), "micro_batch_size=0 is invalid"),
    (dict(model="org/not-in-the-cache"), "not in the local Hugging Face cache"),
    (dict(model="/nonexistent/folder"), "is not a model folder"),
])
def test_bad_jobs_are_one_line(kwargs, match):
    kwargs = {"model": tiny(), **kwargs}
    with pytest.raises(ConfigError, match=match) as err:
        estimate(TrainingJob(**kwargs))
    assert "\n" not in str(err.value)


def test_plan_memory_refuses_a_peft_name_other_than_lora_in_one_line():
    """Only "lora" names a PEFT method; another name crashed inside the estimate (vars() of a str)."""
    with pytest.raises(ConfigError, match="peft='dora' is invalid: use a PEFT method") as err:
        plan_memory(tiny(), peft="dora", seq_length=64)
    assert "\n" not in str(err.value)
    assert plan_memory(tiny(), peft="lora", seq_length=64).estimate.job.peft.dim == 16


def test_the_old_job_names_import_with_a_deprecation_warning():
    import nemo_automodel.export as export
    import nemo_automodel.plan as planner

    with pytest.warns(DeprecationWarning, match="plan.Job is deprecated: use nemo_automodel.plan.TrainingJob"):
        assert planner.Job is TrainingJob
    with pytest.warns(DeprecationWarning, match="export.Job is deprecated: use nemo_automodel.export.GenerationJob"):
        assert export.Job is export.GenerationJob
    with pytest.raises(AttributeError):
        planner.NoSuchName  # noqa: B018


# -- the entry points -----------------------------------------------------------------------------
@pytest.fixture()
def model_dir(tmp_path) -> Path:
    tiny(layers=4, vocab=4096, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from nemo_automodel.launch.plan_cli import main
    from recipes.cli import plan_target

    code = main(list(args), resolve=plan_target)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_command_plans_a_model_folder(capsys, model_dir):
    code, out, err = _cli(capsys, str(model_dir), "--gpus", "2", "--gpu-memory", "80GiB", "--seq", "1024",
                          "trainer.precision=bf16-true", "data.micro_batch_size=1")
    assert code == 0, err
    assert "LlamaForCausalLM" in out and "LoRA" in out and "bf16-true" in out and "DDP over 2 GPUs" in out
    assert "micro batch 1 x 1024 tokens" in out and "verdict: fits in 80.0 GiB per GPU" in out
    for part in ("weights", "gradients", "optimizer state", "activations", "logits + loss", "peak"):
        assert part in out
    code, out, err = _cli(capsys, str(model_dir), "--gpu-memory", "64MiB", "peft=None")
    assert code == 1 and "does not fit in 0.1 GiB per GPU" in out


@pytest.mark.parametrize("args, match", [
    (["--gpu-memory", "80XB"], "error: --gpu-memory='80XB' is invalid"),
    (["--gpus", "0"], "error: --gpus=0 is invalid"),
    (["--seq", "x"], "error: argument --seq: invalid int value"),
    (["bogus"], "error: 'bogus' is not an option or a key=value override"),
    (["model.not_an_arg=1"], "error: override model.not_an_arg"),
    (["--frobnicate"], "error: unrecognized arguments: --frobnicate"),
])
def test_command_bad_input_exits_2_with_one_line(capsys, model_dir, args, match):
    code, out, err = _cli(capsys, str(model_dir), *args)
    assert code == 2 and err.startswith(match) and err.count("\n") == 1, err


def test_command_with_an_uncached_model_id_exits_2(capsys):
    code, out, err = _cli(capsys, "org/not-in-the-cache", "--gpu-memory", "80GiB")
    assert code == 2 and "not in the local Hugging Face cache" in err and err.count("\n") == 1


def test_plan_recipe_reads_the_graph(model_dir):
    from nemo_automodel.launch.plan_recipe import job_from_recipe, plan_recipe
    from recipes import hf_auto_model_for_causal_lm as hf_recipe

    recipe = hf_recipe.finetune_recipe(str(model_dir), precision="bf16-true", micro_batch_size=2, seq_length=256,
                                       num_gpus_per_node=4, strategy="fsdp2", global_batch_size=16)
    recipe.data.packed_sequence_size = 512
    job = job_from_recipe(recipe)
    assert (job.precision, job.devices, job.strategy, job.micro_batch_size, job.accumulate) == \
        ("bf16-true", 4, "fsdp2", 2, 2)
    assert job.seq_length == 512 and job.packed and isinstance(job.peft, LoRA)
    result = plan_recipe(recipe, gpus=8, gpu_memory="80GiB", seq=1024)
    assert result.estimate.job.devices == 8 and result.estimate.job.seq_length == 1024 and result.fits


def test_plan_recipe_refuses_the_megatron_path(model_dir):
    require_module("megatron.core", "megatron-core is installed by make venv (--no-deps)")
    from nemo_automodel.launch.plan_recipe import plan_recipe
    from recipes import hf_auto_model_for_causal_lm as hf_recipe

    with pytest.raises(ConfigError, match="model=MegatronGPTModel: .* Megatron path is not estimated"):
        plan_recipe(hf_recipe.megatron_finetune_recipe(str(model_dir)))


def test_the_recipe_dryrun_prints_the_plan(monkeypatch, capsys, tmp_path, model_dir):
    from nemo_run.config import set_nemorun_home

    from recipes import hf_auto_model_for_causal_lm as hf_recipe
    from recipes.cli import main

    set_nemorun_home(str(tmp_path / "nemorun"))
    for model_id, expected in ((str(model_dir), "memory plan: LlamaForCausalLM"),
                               ("/models/x", "memory plan: not estimated (model='/models/x' is not a model folder")):
        monkeypatch.setattr(sys, "argv", ["hf_auto_model_for_causal_lm.py", f"model.model_id={model_id}", "--dryrun"])
        main(hf_recipe.finetune_recipe)
        assert expected in capsys.readouterr().out
