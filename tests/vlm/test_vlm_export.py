"""VLM checkpoints export like text ones: the LoRA adapter reloads on its base with the trained logits, the
merged and full-SFT exports load with ``AutoModelForImageTextToText`` + ``load_processor`` and give the same
logits on an image prompt, the adapter export passes the vLLM servability check, GGUF is refused in one
line, and prompts with images travel to the vLLM runner as PNG."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from vlm_export_support import image, logits, prompt_inputs, train

from nemo_automodel.errors import ConfigError
from nemo_automodel.export import check_servable, export
from nemo_automodel.export.deploy import wire_prompt
from nemo_automodel.models.processor import load_processor

TOL = 1e-5
PROCESSOR_FILES = {"processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def lora_run(tiny_vlm_dir, tmp_path_factory):
    base = tiny_vlm_dir("idefics3")
    run, model = train(base, tmp_path_factory.mktemp("vlm-runs"), "lora", lora=True, steps=3)
    return base, run, model


@pytest.fixture(scope="module")
def sft_run(tiny_vlm_dir, tmp_path_factory):
    base = tiny_vlm_dir("qwen2_vl")
    run, model = train(base, tmp_path_factory.mktemp("vlm-runs"), "sft", lora=False, steps=3, lr=1e-3)
    return base, run, model


def _auto(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def _adapter_on_base(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_auto(base), adapter).eval()


@pytest.mark.slow
def test_checkpoint_adapter_on_base_equals_the_trained_model(lora_run):
    base, run, trained = lora_run
    inputs = prompt_inputs(load_processor(str(base)), 1)
    assert "pixel_values" in inputs
    reloaded = logits(_adapter_on_base(base, run / "checkpoints" / "last" / "hf_adapter"), inputs)
    assert (reloaded - logits(trained.model, inputs)).abs().max().item() <= TOL
    assert (reloaded - logits(_auto(base), inputs)).abs().max().item() > 1e-3  # the adapter changed something


@pytest.mark.slow
def test_merged_export_loads_with_processor_and_equals_adapter_on_base(lora_run, tmp_path):
    base, run, _ = lora_run
    out = export(run, tmp_path / "merged", mode="merged")
    assert PROCESSOR_FILES <= {p.name for p in out.iterdir()}
    merged, processor = _auto(out), load_processor(str(out))
    assert type(merged).__name__ == "Idefics3ForConditionalGeneration"
    inputs = prompt_inputs(processor, 2)
    expected = prompt_inputs(load_processor(str(base)), 2)
    assert all(torch.equal(inputs[k], expected[k]) for k in expected)  # the export's processor is the base's
    adapter = run / "checkpoints" / "last" / "hf_adapter"
    assert (logits(merged, inputs) - logits(_adapter_on_base(base, adapter), inputs)).abs().max().item() <= TOL


@pytest.mark.slow
def test_adapter_export_is_servable_on_the_vlm_base(lora_run, tmp_path):
    base, run, _ = lora_run
    out = export(run, tmp_path / "adapter", mode="adapter")
    manifest = json.loads((out / "nemo_export.json").read_text())
    assert manifest["model"] == str(base.resolve()) and PROCESSOR_FILES <= {p.name for p in out.iterdir()}
    info = check_servable(out / "adapter", str(base))
    assert len(info.modules) == 2 * 7 and all(".text_model.layers." in m for m in info.modules)
    assert sorted(info.modules) == sorted(manifest["lora_modules"]) and info.max_lora_rank == 8


@pytest.mark.slow
def test_full_sft_export_equals_the_trained_model(sft_run, tmp_path):
    base, run, trained = sft_run
    out = export(run, tmp_path / "sft")
    assert PROCESSOR_FILES <= {p.name for p in out.iterdir()}
    inputs = prompt_inputs(load_processor(str(out)), 3)
    assert "image_grid_thw" in inputs
    exported = logits(_auto(out), inputs)
    assert (exported - logits(trained.model, inputs)).abs().max().item() <= TOL
    assert (exported - logits(_auto(base), inputs)).abs().max().item() > 1e-3  # full SFT moved the weights


@pytest.mark.slow
@pytest.mark.parametrize("which", ["lora", "sft"])
def test_gguf_export_of_a_vlm_is_refused_in_one_line(which, lora_run, sft_run, tmp_path):
    run = (lora_run if which == "lora" else sft_run)[1]
    with pytest.raises(ConfigError, match=r"is a vision-language model \(\w+Config\) and GGUF export of "
                                          r"vision-language models is not supported") as err:
        export(run, tmp_path / "gguf", format="gguf")
    assert "\n" not in str(err.value) and not (tmp_path / "gguf").exists()


def _pixels(encoded: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


def test_prompt_images_travel_as_png_in_placeholder_order(tmp_path):
    first, second = image(0), image(1)
    second.save(tmp_path / "second.png")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                 {"type": "image", "image": str(tmp_path / "second.png")}]}]
    wired = wire_prompt({"prompt": conversation, "images": [first]})
    assert wired["prompt"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]
    assert [(_pixels(e) == np.asarray(i)).all() for e, i in zip(wired["images"], (first, second))] == [True, True]
    json.dumps(wired)
    assert wire_prompt("plain") == "plain" and wire_prompt({"prompt": "raw <image>", "images": []}) == "raw <image>"
    with pytest.raises(ConfigError, match=r"prompt: a prompt dict needs 'prompt'"):
        wire_prompt({"text": "x"})
