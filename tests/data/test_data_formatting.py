"""Formatting: which tokens each built-in formatting trains on, checked by decoding them."""

from __future__ import annotations

import datasets
import pytest
import torch

from nemo_automodel.data import HFDatasetDataModule, SquadHFDataModule, chat_tokens
from nemo_automodel.errors import ConfigError

SQUAD = [
    {"context": "Paris is the capital of France.", "question": "What is the capital of France?",
     "answers": {"text": ["  Paris "], "answer_start": [0]}},
    {"context": "The Nile flows through Egypt.", "question": "Which river flows through Egypt?",
     "answers": {"text": ["The Nile", "Nile"], "answer_start": [0, 4]}},
]
CHAT = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "3+3?"},
     {"role": "assistant", "content": "6."}],
]


def _all_rows(dm: HFDatasetDataModule) -> list[dict]:
    return [dm.train_dataset[i] for i in range(len(dm.train_dataset))]


def _masked_text(tokenizer, row) -> str:
    labels = torch.as_tensor(row["labels"])
    return tokenizer.decode(labels[torch.as_tensor(row["loss_mask"]).bool()])


def test_squad_loss_covers_exactly_answer_and_eos(tokenizer):
    dm = SquadHFDataModule(datasets.Dataset.from_list(SQUAD), shuffle=False)
    dm.setup(tokenizer)
    rows = _all_rows(dm)
    assert [_masked_text(tokenizer, r) for r in rows] == [" Paris<|im_end|>", " The Nile<|im_end|>"]
    for row, ex in zip(rows, SQUAD, strict=True):
        prompt = f"Context: {ex['context']} Question: {ex['question']} Answer:"
        full = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n_prompt = len(full) - 1  # positions whose target is still a prompt token
        assert row["input_ids"].tolist()[: len(full)] == full
        assert row["loss_mask"][:n_prompt].sum() == 0 and row["loss_mask"][n_prompt:].all()
        assert row["labels"][-1] == tokenizer.eos_token_id
        assert row["labels"][:-1].tolist() == row["input_ids"][1:].tolist()  # labels are shifted inputs


def test_eos_target_stays_in_loss_when_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: both <|im_end|>
    dm = SquadHFDataModule(datasets.Dataset.from_list(SQUAD), micro_batch_size=2, shuffle=False)
    dm.setup(tokenizer)
    batch = next(dm.train_batches())
    lengths = [len(dm.train_dataset[i]["input_ids"]) for i in range(2)]
    short, n = min(enumerate(lengths), key=lambda x: x[1])  # the row that gets padded
    assert n < batch["input_ids"].shape[1]
    assert batch["labels"][short, n - 1] == tokenizer.eos_token_id and batch["loss_mask"][short, n - 1] == 1
    assert (batch["labels"][short, n:] == tokenizer.eos_token_id).all()
    assert (batch["loss_mask"][short, n:] == 0).all()


def test_chat_loss_covers_exactly_assistant_turns(tokenizer):
    dm = HFDatasetDataModule(datasets.Dataset.from_list([{"messages": m} for m in CHAT]), formatting="chat",
                             shuffle=False)
    dm.setup(tokenizer)
    rows = _all_rows(dm)
    assert _masked_text(tokenizer, rows[0]) == "Hello, how can I help?<|im_end|>\n"
    assert _masked_text(tokenizer, rows[1]) == "4.<|im_end|>\n6.<|im_end|>\n"
    whole = tokenizer.apply_chat_template(CHAT[1], tokenize=False)
    assert tokenizer.decode(rows[1]["input_ids"].tolist() + [rows[1]["labels"][-1]]) == whole


def test_chat_spans_are_contiguous_per_assistant_turn(tokenizer):
    full, mask = chat_tokens(CHAT[1], tokenizer)
    starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(starts) == 2
    assert tokenizer.decode(full[: starts[0]]).endswith("<|im_start|>assistant\n")


def test_chat_without_template_names_tokenizer(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    dm = HFDatasetDataModule(datasets.Dataset.from_list([{"messages": CHAT[0]}]), formatting="chat")
    with pytest.raises(ConfigError, match="chat template.*" + str(tokenizer.name_or_path)[-20:]):
        dm.setup(tok)


def test_chat_template_breaking_prefix_property(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    # Renders the number of messages first: a prefix never renders as the start of the whole.
    tok.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    dm = HFDatasetDataModule(datasets.Dataset.from_list([{"messages": CHAT[0]}]), formatting="chat")
    with pytest.raises(ConfigError, match="prefix"):
        dm.setup(tok)


def test_text_formatting_trains_on_every_token(tokenizer):
    dm = HFDatasetDataModule(datasets.Dataset.from_list([{"text": "Once upon a time."}]), formatting="text")
    dm.setup(tokenizer)
    row = dm.train_dataset[0]
    assert row["loss_mask"].all()
    assert tokenizer.decode(row["labels"]) == "Once upon a time.<|im_end|>"
    assert row["input_ids"][0] == tokenizer.bos_token_id


def test_pretokenized_rows_only_input_ids_are_shifted(tokenizer):
    ds = datasets.Dataset.from_list([{"input_ids": [5, 6, 7, 8]}])
    dm = HFDatasetDataModule(ds)
    dm.setup(tokenizer)
    row = dm.train_dataset[0]
    assert row["input_ids"].tolist() == [5, 6, 7] and row["labels"].tolist() == [6, 7, 8]
    assert row["loss_mask"].tolist() == [1, 1, 1]


def test_pretokenized_nemo_style_rows_kept_as_given(tokenizer):
    row = {"input_ids": [5, 6, 7], "labels": [6, 7, -100], "loss_mask": [0, 1, 1]}
    ds = datasets.Dataset.from_list([row])
    dm = HFDatasetDataModule(ds, pad_token_id=0)
    dm.setup(tokenizer)
    row = dm.train_dataset[0]
    assert row["input_ids"].tolist() == [5, 6, 7]
    assert row["labels"].tolist() == [6, 7, 0]  # -100 becomes pad and is masked out
    assert row["loss_mask"].tolist() == [0, 1, 0]


def test_callable_formatting(tokenizer):
    def fmt(example, tok):
        ids = tok(example["q"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {"input_ids": ids}

    dm = HFDatasetDataModule(datasets.Dataset.from_list([{"q": "hello world"}]), formatting=fmt)
    dm.setup(tokenizer)
    assert tokenizer.decode(dm.train_dataset[0]["labels"]) == " world<|im_end|>"


def test_truncation_to_seq_length(tokenizer):
    dm = HFDatasetDataModule(datasets.Dataset.from_list([{"input_ids": list(range(100))}]), seq_length=16)
    dm.setup(tokenizer)
    row = dm.train_dataset[0]
    assert len(row["input_ids"]) == 16 and row["labels"].tolist() == list(range(1, 17))


def test_rows_without_loss_dropped_with_one_warning(tokenizer, caplog):
    long_ctx = dict(SQUAD[0], context="word " * 200)
    dm = SquadHFDataModule(datasets.Dataset.from_list([long_ctx, SQUAD[1]]), seq_length=64)
    with caplog.at_level("WARNING"):
        dm.setup(tokenizer)
    assert len(dm.train_dataset) == 1
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 1 of 2" in warnings[0].getMessage()


def test_every_row_dropped_names_seq_length_and_shortest_prompt(tokenizer):
    dm = SquadHFDataModule(datasets.Dataset.from_list(SQUAD), seq_length=8)
    with pytest.raises(ConfigError, match=r"seq_length=8 is shorter than the prompts .*shortest prompt has "
                                          r"\d+ tokens.*raise seq_length"):
        dm.setup(tokenizer)


@pytest.mark.parametrize(("formatting", "column"), [("squad", "context"), ("chat", "messages"),
                                                     ("text", "text"), (None, "input_ids")])
def test_missing_column_names_column_formatting_and_columns(tokenizer, formatting, column):
    dm = HFDatasetDataModule(datasets.Dataset.from_list([{"prompt": "x", "question": "q"}]),
                             formatting=formatting)
    match = rf"formatting=.*needs a '{column}' column .*\['prompt', 'question'\]"
    with pytest.raises(ConfigError, match=match):
        dm.setup(tokenizer)


def test_unknown_formatting_rejected_at_construction():
    with pytest.raises(ConfigError, match="formatting='alpaca'"):
        HFDatasetDataModule("unused", formatting="alpaca")
