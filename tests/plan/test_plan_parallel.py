"""The memory planner with tensor and context parallel: the numbers at T=2 vs T=1 and C=2 vs C=1 follow
from the model's shapes and the TP plan (computed here from the test's config), the recipe adapter reads
the sizes from the strategy node, and impossible layouts are one line (fast: meta device only)."""

from __future__ import annotations

import fiddle as fdl
import pytest
import transformers
from test_plan import lora, n_params, tiny

from nemo_automodel.errors import ConfigError
from nemo_automodel.parallel.strategy import FSDP2Strategy
from nemo_automodel.plan import TrainingJob, estimate
from nemo_automodel.plan.accounting import ACTIVATION_ROW, GRADIENTS, LOGITS_ROW, OPTIMIZER, WEIGHTS
from nemo_automodel.plan.report import describe


def _shapes(cfg) -> list[tuple[int, int, str]]:
    """(in, out, style) of one decoder layer's Linear layers under Llama's base_model_tp_plan."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return [(h, h, "colwise"), (h, kv, "colwise"), (h, kv, "colwise"), (h, h, "rowwise"),
            (h, i, "colwise"), (h, i, "colwise"), (i, h, "rowwise")]


def _tp_sharded(cfg) -> int:
    """Parameters the plan shards: every projection weight (Llama's have no bias)."""
    return cfg.num_hidden_layers * sum(a * b for a, b, _ in _shapes(cfg))


def _local_adapters(cfg, tp: int, r: int = 8) -> int:
    """LoRA parameters on one TP rank: colwise layers shard lora_B, rowwise ones lora_A."""
    per_layer = sum(r * a + r * b // tp if style == "colwise" else r * a // tp + r * b for a, b, style in _shapes(cfg))
    return cfg.num_hidden_layers * per_layer


def _job(cfg, **kw) -> TrainingJob:
    return TrainingJob(cfg, seq_length=256, strategy="fsdp2", **kw)


def test_tp_divides_the_sharded_linear_layers_and_keeps_the_rest_whole():
    cfg = tiny()
    n, sharded = n_params(cfg), _tp_sharded(cfg)
    rest = n - sharded  # embeddings, norms, output layer: not in the plan
    fsdp = estimate(_job(cfg, devices=2))
    assert fsdp.sizes[WEIGHTS] == 4 * n / 2
    tp_only = estimate(_job(cfg, devices=2, tensor_parallel=2))  # dp 1: no FSDP
    assert tp_only.sizes == {WEIGHTS: 4 * (rest + sharded / 2), GRADIENTS: 4 * (rest + sharded / 2),
                             OPTIMIZER: 8 * (rest + sharded / 2)}
    both = estimate(_job(cfg, devices=4, tensor_parallel=2))  # FSDP over the 2 replicas on top
    assert both.sizes[WEIGHTS] == pytest.approx(4 * (rest + sharded / 2) / 2)
    assert (both.params, both.trainable) == (n, n)  # the report counts the whole model
    assert "FSDP2 over 4 GPUs (dp 2 x cp 1 x tp 2)" in describe(both)


def test_tp_with_lora_shards_each_adapter_with_its_layer():
    cfg = tiny()
    for tp in (1, 2):
        est = estimate(_job(cfg, peft=lora(), devices=tp, tensor_parallel=tp))
        assert est.sizes[GRADIENTS] == 4 * _local_adapters(cfg, tp)
        assert est.sizes[OPTIMIZER] == 8 * _local_adapters(cfg, tp)
        assert est.trainable == _local_adapters(cfg, 1)


def test_tp_activations_shrink_to_between_half_and_all_and_logits_stay_whole():
    cfg = tiny(vocab=256)
    one, two = (estimate(_job(cfg, peft=lora(), devices=t, tensor_parallel=t)) for t in (1, 2))
    # attention and MLP intermediates split over the ranks; the residual stream and norms stay whole
    assert one.components[ACTIVATION_ROW] / 2 < two.components[ACTIVATION_ROW] < one.components[ACTIVATION_ROW]
    assert two.components[LOGITS_ROW] == one.components[LOGITS_ROW]  # the output layer is replicated


def test_cp_divides_the_sequence_and_shards_states_over_dp_times_cp():
    cfg = tiny()
    cp = estimate(_job(cfg, devices=4, context_parallel=2))
    dp4_half_seq = estimate(TrainingJob(cfg, seq_length=128, strategy="fsdp2", devices=4))
    # one rank's step is that of half the sequence, and FSDP shards over dp 2 x cp 2 = 4
    assert cp.components == dp4_half_seq.components and cp.sizes == dp4_half_seq.sizes
    assert cp.sizes[WEIGHTS] == 4 * n_params(cfg) / 4
    # a row is padded to a multiple of 2 x C first: 250 tokens -> 252 -> 126 per rank
    padded = estimate(TrainingJob(cfg, seq_length=250, strategy="fsdp2", devices=4, context_parallel=2))
    assert padded.components == estimate(TrainingJob(cfg, seq_length=126, strategy="fsdp2", devices=4)).components


@pytest.mark.parametrize("kwargs, match", [
    (dict(tensor_parallel=2), "tensor_parallel=2 x context_parallel=1 must divide devices=1"),
    (dict(tensor_parallel=2, devices=6, context_parallel=2), "must divide devices=6"),
    (dict(tensor_parallel=2, devices=2, strategy="ddp"), "strategy='ddp' is invalid: tensor/context parallel run on"),
    (dict(context_parallel=2, devices=2, strategy="fsdp2", device="cpu"), "context_parallel=2 is invalid"),
    (dict(context_parallel=2, devices=2, strategy="fsdp2", packed=True), "unpacked rows on CUDA only"),
    (dict(tensor_parallel=2, devices=2, strategy="fsdp2", quantization="nf4", peft=lora()), "4-bit"),
    (dict(tensor_parallel=3, devices=3, strategy="fsdp2"), "tensor_parallel_size=3 does not divide"),
])
def test_impossible_layouts_are_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        estimate(TrainingJob(tiny(), **kwargs))
    assert "\n" not in str(err.value)


def test_the_recipe_adapter_reads_the_strategy_sizes(tmp_path):
    import nemo_run as run

    from nemo_automodel.launch.plan_recipe import job_from_recipe, plan_recipe
    from recipes import hf_auto_model_for_causal_lm as hf_recipe

    tiny(layers=4, vocab=4096, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "model")
    recipe = hf_recipe.finetune_recipe(str(tmp_path / "model"), micro_batch_size=1, seq_length=512,
                                       global_batch_size=8)
    recipe.trainer.strategy = run.Config(FSDP2Strategy, tensor_parallel_size=2, context_parallel_size=2)
    job = job_from_recipe(recipe, gpus=8)
    assert (job.tensor_parallel, job.context_parallel, job.data_parallel, job.strategy) == (2, 2, 2, "fsdp2")
    assert job.accumulate == 8 // (1 * 2)  # the global batch is over the 2 replicas, not the 8 GPUs
    assert job.precision == "bf16-true"  # the recipe's "auto" on a planned GPU, for LoRA
    same = TrainingJob(transformers.AutoConfig.from_pretrained(tmp_path / "model"), peft=job.peft, strategy="fsdp2",
               precision="bf16-true",
               devices=8, micro_batch_size=1, seq_length=512, accumulate=4, tensor_parallel=2, context_parallel=2)
    assert plan_recipe(recipe, gpus=8).estimate.components == estimate(same).components
    assert isinstance(recipe.trainer.strategy, fdl.Buildable)  # read, not built
