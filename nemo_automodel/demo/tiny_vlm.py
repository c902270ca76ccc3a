"""Tiny random vision-language models with their processors, written to a folder, fully offline.

``build_tiny_vlm(family, out_dir)`` writes a model that ``AutoModelForImageTextToText`` and
``nemo_automodel.models.processor.load_processor`` load: text 2 layers, hidden 64, 2 heads of
head_dim 32 (vLLM's CPU attention needs head_dim >= 32); vision tower 2 layers, hidden 64; 4-16
image tokens per image. The tokenizer is a byte-level BPE trained here on a fixed corpus, with
the family's special tokens and a chat template of the family's real shape (assistant turns
wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask`` works). Same seed, same files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_VLM_FAMILIES = ("qwen2_vl", "idefics3", "llava", "gemma3")

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=512)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
VOCAB_SIZE = 600  # byte alphabet (256) + specials + merges

_CORPUS = """\
What digit is this? The digit is 0. The digit is 1. It is 2. It is 3. This is 4. This is 5.
6 7 8 9 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100
user assistant system model User Assistant USER ASSISTANT SYSTEM
You are a helpful assistant. Hello! Hi, how are you? I am fine, thank you. What is in the image?
Describe the picture. The picture shows a handwritten digit. A black and white image of a number.
Please answer with one word. Yes. No. Maybe. Thanks! Good morning. Good night. Goodbye.
Can you see the image? I can see a small picture. Which number is written here? Count the dots.
The answer is seven. The answer is zero, one, two, three, four, five, six, seven, eight or nine.
system: You are a helpful assistant. user: What digit is this? assistant: 3. model: 8.
What color is the background? It is black. The number is white. There is one digit in the image.
Look at the picture and tell me the number. Sure, the number is 4. Let me think about it.
Is this a cat or a dog? Neither, it is a handwritten number. Where is the digit? In the middle.
"""


# ---------------------------------------------------------------------------- tokenizer
def _tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str, unk: str | None = None,
               chat_template: str, extra: dict[str, str] | None = None) -> Any:
    """A byte-level BPE trained on ``_CORPUS``; ``specials`` get the first ids, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    return PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=chat_template,
                                   extra_special_tokens=extra or {},
                                   **{k: v for k, v in named.items() if v is not None})


def _say(text: str) -> str:
    """``text`` as a Jinja expression, so the template's whitespace control never trims it."""
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _chat_template(*, image: str, head: str, end_user: str, end_assistant: str, generation_prompt: str,
                   bos: str = "", default_system: str = "") -> str:
    """A chat template: ``bos``, then per message ``head`` (a Jinja expression over ``message``),
    the parts (images as ``image``, texts verbatim) and the turn end; assistant turns are marked
    with ``{% generation %}``."""
    system = f"{{%- if messages[0]['role'] != 'system' -%}}{_say(default_system)}{{%- endif -%}}"
    return (
        "{%- macro parts(message) -%}{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{_say(image)}{{%- elif part['type'] == 'text' -%}}{{{{ part['text'] }}}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
        + _say(bos) + (system if default_system else "")
        + "{%- for message in messages -%}"
        f"{{{{ {head} }}}}"
        "{%- if message['role'] == 'assistant' -%}"
        f"{{% generation %}}{{{{ parts(message) }}}}{_say(end_assistant)}{{% endgeneration %}}"
        f"{{%- else -%}}{{{{ parts(message) }}}}{_say(end_user)}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{_say(generation_prompt)}{{%- endif -%}}"
    )


def _ids(tok: Any, *tokens: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in ids or tok.unk_token is None, tokens
    return ids


def _text_ids(tok: Any) -> dict[str, Any]:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


# ---------------------------------------------------------------------------- families
def _qwen2_vl() -> tuple[Any, Any]:
    """Qwen2-VL: ChatML; a 56x56 image is 4x4 patches of 14 px, merged 2x2 into 4 tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from nemo_automodel.models.processor import without_video

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    template = _chat_template(
        image="<|vision_start|><|image_pad|><|vision_end|>", head="'<|im_start|>' + message['role'] + '\\n'",
        end_user="<|im_end|>\n", end_assistant="<|im_end|>\n", generation_prompt="<|im_start|>assistant\n",
        default_system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    tok = _tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=template)
    image_id, video_id, start_id, end_id = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                "<|vision_end|>")
    config = Qwen2VLConfig(
        text_config=dict(**TEXT, **_text_ids(tok), rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                         mrope_section=[4, 6, 6])),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=image_id, video_token_id=video_id, vision_start_token_id=start_id,
        vision_end_token_id=end_id)
    pixels = 56 * 56
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels},
                                               patch_size=14, temporal_patch_size=2, merge_size=2)
    return config, without_video(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                   chat_template=template)


def _idefics3() -> tuple[Any, Any]:
    """Idefics3: "User:<image>...<end_of_utterance>"; one 32 px image (no splitting) is 8x8 patches
    of 4 px, pixel-shuffled by 2 into 16 tokens."""
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    rows = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<end_of_utterance>",
                "<fake_token_around_image>", "<image>", "<global-img>", *rows]
    template = _chat_template(
        image="<image>", bos="<|begin_of_text|>",
        head="message['role'] | capitalize + (':' if message['content'] is not string "
             "and message['content'][0]['type'] == 'image' else ': ')",
        end_user="<end_of_utterance>\n", end_assistant="<end_of_utterance>\n", generation_prompt="Assistant:")
    tok = _tokenizer(specials, bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|finetune_right_pad_id|>",
                     chat_template=template)
    image_size, patch, scale = 32, 4, 2
    # transformers' @strict config signatures omit the **kwargs that PreTrainedConfig stores (pad_token_id)
    config = Idefics3Config(  # type: ignore[call-arg]
        text_config=dict(model_type="llama", **TEXT, **_text_ids(tok)),
        vision_config=dict(**VISION, image_size=image_size, patch_size=patch),
        scale_factor=scale, image_token_id=_ids(tok, "<image>")[0], pad_token_id=tok.pad_token_id)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size},
                                                max_image_size={"longest_edge": image_size})
    seq_len = (image_size // patch) ** 2 // scale**2
    return config, Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
                                     chat_template=template)


def _llava() -> tuple[Any, Any]:
    """LLaVA-1.5 (CLIP tower): "USER: <image>\\n... ASSISTANT: ...</s>"; a 32 px image is 4x4
    patches of 8 px, CLS dropped: 16 tokens."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaProcessor

    template = _chat_template(image="<image>\n", head="message['role'] | upper + ': '", end_user=" ",
                              end_assistant="</s>", generation_prompt="ASSISTANT:", bos="<s>")
    tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                     chat_template=template)
    image_size, patch = 32, 8
    tokens = (image_size // patch) ** 2
    config = LlavaConfig(  # type: ignore[call-arg]  # pad_token_id: as for Idefics3Config above
        text_config=dict(model_type="llama", **TEXT, **_text_ids(tok)),
        vision_config=dict(model_type="clip_vision_model", **VISION, image_size=image_size, patch_size=patch,
                           projection_dim=64),
        image_token_index=_ids(tok, "<image>")[0], image_seq_length=tokens, vision_feature_layer=-1,
        vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return config, LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=template)


def _gemma3() -> tuple[Any, Any]:
    """Gemma3 (SigLIP tower): "<start_of_turn>user\\n<start_of_image>..."; a 32 px image is 8x8
    patches of 4 px, average-pooled to 4x4 = 16 soft tokens between <start_of_image>/<end_of_image>."""
    from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    template = _chat_template(
        image="<start_of_image>", bos="<bos>",
        head="'<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'",
        end_user="<end_of_turn>\n", end_assistant="<end_of_turn>\n", generation_prompt="<start_of_turn>model\n")
    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", chat_template=template,
                     extra=extra)
    image_size, patch, tokens = 32, 4, 16
    boi, eoi, image = _ids(tok, *extra.values())
    config = Gemma3Config(
        text_config=dict(**TEXT, **_text_ids(tok), query_pre_attn_scalar=TEXT["head_dim"], sliding_window=64),
        vision_config=dict(**VISION, image_size=image_size, patch_size=patch, vision_use_head=False),
        mm_tokens_per_image=tokens, boi_token_index=boi, eoi_token_index=eoi, image_token_index=image)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                              do_pan_and_scan=False)
    return config, Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens,
                                   chat_template=template)


_FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen2_vl": _qwen2_vl, "idefics3": _idefics3, "llava": _llava, "gemma3": _gemma3}


def build_tiny_vlm(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` VLM (fp32 safetensors) and its processor to ``out_dir``."""
    import torch
    from transformers import AutoModelForImageTextToText

    if family not in _FAMILIES:
        from nemo_automodel.errors import bad_value

        raise bad_value("family", family, f"use one of {', '.join(TINY_VLM_FAMILIES)}")
    config, processor = _FAMILIES[family]()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
