"""`to_megatron` / `to_automodel`: graph rewrites that keep weights, optimizer and data, and train."""

from __future__ import annotations

from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest
import torch
import transformers

from nemo_automodel.errors import ConfigError
from nemo_automodel.megatron import MegatronGPTModel, MegatronStrategy
from nemo_automodel.megatron.optim import MegatronOptimizerModule
from nemo_automodel.megatron.swap import to_automodel, to_megatron
from nemo_automodel.trainer.optim import PytorchOptimizerModule
from recipes.hf_auto_model_for_causal_lm import finetune_recipe
from tests.helpers import train_losses


def _recipe(model_dir, data, tmp_path, name, peft_scheme="lora", max_steps=6, **kw) -> run.Partial:
    from nemo_automodel.llm import adam

    recipe = finetune_recipe(model_id=str(model_dir), dataset=str(data), formatting=None, peft_scheme=peft_scheme,
                             dir=str(tmp_path / "runs"), name=name, max_steps=max_steps, seq_length=64,
                             micro_batch_size=2, global_batch_size=4, **kw)
    recipe.optim = adam.pytorch_adam_with_cosine_annealing(max_lr=1e-2, warmup_steps=1, weight_decay=0.01,
                                                           betas=(0.9, 0.98), eps=1e-7)
    recipe.data.pad_token_id = 0
    recipe.trainer.enable_progress_bar = False
    recipe.trainer.precision = "32"  # both paths in fp32: compared to 1e-5 ("auto" keeps Megatron fp32 on CPU anyway)
    recipe.log.tensorboard = False
    return recipe


def test_rewrite_swaps_model_optimizer_strategy_and_round_trips(megatron_model_factory, token_file, tmp_path):
    recipe = _recipe(megatron_model_factory("qwen2"), token_file, tmp_path, "r", num_gpus_per_node=2)
    before = recipe.__repr__()
    mg = to_megatron(recipe, tensor_parallel=2)
    assert recipe.__repr__() == before  # the input graph is untouched
    assert fdl.get_callable(mg.model) is MegatronGPTModel and mg.model.model_id == recipe.model.model_id
    assert fdl.get_callable(mg.trainer.strategy) is MegatronStrategy
    assert mg.trainer.strategy.tensor_model_parallel_size == 2
    assert fdl.get_callable(mg.optim) is MegatronOptimizerModule
    cfg = mg.optim.config
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps) == \
        ("adam", 1e-2, 0.01, 0.9, 0.98, 1e-7)
    assert mg.optim.lr_scheduler == recipe.optim.lr_scheduler
    assert mg.peft == recipe.peft and mg.data == recipe.data and mg.log == recipe.log
    built = fdl.build(mg.optim)  # the optimizer the job builds carries the same hyper-parameters
    opt, _ = built.build([torch.nn.Parameter(torch.zeros(2))], 10)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and group["betas"] == (0.9, 0.98) and group["eps"] == 1e-7
    assert to_automodel(mg) == recipe
    assert fdl.get_callable(to_automodel(mg).optim) is PytorchOptimizerModule


def test_rewrite_refuses_unsupported_models_and_sizes(tiny_model_factory, megatron_model_factory, token_file, tmp_path):
    gpt2 = _recipe(tiny_model_factory("gpt2"), token_file, tmp_path, "g")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel has no Megatron-Core mapping"):
        to_megatron(gpt2)
    qwen = _recipe(megatron_model_factory("qwen2"), token_file, tmp_path, "q", num_gpus_per_node=3)
    with pytest.raises(ConfigError, match="tensor_parallel=2 does not divide the trainer's 3 devices"):
        to_megatron(qwen, tensor_parallel=2)
    qwen.trainer.devices = 8
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=8 does not divide"):
        to_megatron(qwen, tensor_parallel=8)  # 4 heads, 2 query groups
    with pytest.raises(ConfigError, match="recipe.model must be a MegatronGPTModel node"):
        to_automodel(qwen)
    qwen.trainer.devices = 1
    qwen.model.activation_checkpointing = True
    with pytest.raises(ConfigError, match="activation_checkpointing=True is not carried to Megatron-Core"):
        to_megatron(qwen)


def _refused_at_swap_and_configure(model_dir: Path, token_file, tmp_path) -> str:
    """The one-line refusal of ``to_megatron``, asserted to be the one ``configure_model`` (under a set-up
    ``megatron_strategy``) gives where the model's config could not be read at swap time (a Hub id offline)."""
    with pytest.raises(ConfigError) as swap:
        to_megatron(_recipe(model_dir, token_file, tmp_path, "swap"))
    with pytest.raises(ConfigError) as configure:
        MegatronGPTModel(str(model_dir)).configure_model()
    assert str(configure.value) == str(swap.value) and "\n" not in str(swap.value)
    return str(swap.value)


@pytest.mark.parametrize(("arch", "family", "named", "absent"), [
    ("qwen3_moe", "Qwen3MoeForCausalLM", "mixture-of-experts MLPs (4 routed experts, top-2", "Mamba"),
    ("mixtral", "MixtralForCausalLM", "mixture-of-experts MLPs (4 routed experts, top-2", "Mamba"),
    ("mamba2", "Mamba2ForCausalLM", "Mamba (SSM) mixers (2 of 2 layers", "experts"),
    # Nemotron-H's config carries expert counts, but its pattern ``M*M-`` has no MoE layer: only the SSM is named
    ("nemotron_h", "NemotronHForCausalLM", "Mamba (SSM) mixers (2 of 4 layers", "experts"),
])
@pytest.mark.usefixtures("megatron_strategy")
def test_rewrite_refuses_moe_and_mamba_models(arch, family, named, absent, tiny_model_factory, token_file, tmp_path):
    message = _refused_at_swap_and_configure(tiny_model_factory(arch), token_file, tmp_path)
    assert message.startswith(f"{family} ({arch}) cannot move to Megatron-Core"), message
    assert f"no mapping for its {named}" in message and absent not in message, message


@pytest.mark.slow
@pytest.mark.parametrize("peft_scheme", ["lora", None])
def test_megatron_recipe_trains_from_the_same_weights_and_exports_hf(peft_scheme, megatron_model_factory,
                                                                     token_file, tmp_path):
    model_dir = megatron_model_factory("llama")
    auto = _recipe(model_dir, token_file, tmp_path, "auto", peft_scheme=peft_scheme)
    auto_dir = fdl.build(auto)()
    mg_recipe = to_megatron(_recipe(model_dir, token_file, tmp_path, "mg", peft_scheme=peft_scheme))
    mg_dir = fdl.build(mg_recipe)()
    auto_losses, mg_losses = train_losses(auto_dir), train_losses(mg_dir)
    # same weights, same first batch: the first loss agrees; then both learn
    assert abs(mg_losses[0] - auto_losses[0]) / auto_losses[0] < 1e-5, (mg_losses, auto_losses)
    assert mg_losses[-1] < mg_losses[0] - 0.05, mg_losses

    last = Path(mg_dir) / "checkpoints" / "last"
    strategy = MegatronStrategy()  # the trained Megatron model, reloaded from its DCP state
    strategy.setup("cpu")
    try:
        model = MegatronGPTModel(str(model_dir))
        module = model.configure_model()
        if peft_scheme:
            module = model.apply_peft(fdl.build(mg_recipe.peft))
        _load_dcp(module, last)
        ids = torch.arange(2 * 16).reshape(2, 16) * 37 % 509 + 3
        with torch.no_grad():
            ours = model.logits(module.eval(), {"input_ids": ids})
    finally:
        strategy.teardown()
    if peft_scheme:
        from peft import PeftModel

        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        hf = PeftModel.from_pretrained(base, last / "hf_adapter").eval()
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(last / "model").eval()
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    assert (ours - ref).abs().max().item() < 1e-4


def _load_dcp(module: torch.nn.Module, ckpt: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    state = {"model": get_model_state_dict(module, options=options)}
    dcp.load(state, checkpoint_id=str(ckpt / "state"), no_dist=True)
    set_model_state_dict(module, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
