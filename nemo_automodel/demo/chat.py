"""Greedy chat generation with transformers, used by the demo, tutorials and export checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch


class GeneratingModel(Protocol):
    """A transformers model that generates (``GenerationMixin``), or a peft wrapper of one."""

    def eval(self) -> Any: ...
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


@torch.no_grad()
def generate_chat(model: GeneratingModel, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Answer each user prompt greedily through the tokenizer's chat template."""
    model.eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        ids = ids.to(next(model.parameters()).device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers
