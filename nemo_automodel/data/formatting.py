"""Turn raw rows into shifted training samples: ``input_ids``, ``labels``, ``loss_mask``.

A formatter works on a batch of columns (``Dataset.map(batched=True, with_indices=True)``) and
returns, per row, the shifted and truncated sample plus what the data preflight and the dropped-row
messages read: ``prompt_len`` (the index of the first counted target before truncation, -1 when the
row has none), ``full_len`` (positions before truncation) and ``replies`` (the replies the row
holds, -1 when the formatting cannot tell).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import compress, count
from typing import Any

from nemo_automodel.errors import ConfigError, bad_value

FORMATTINGS = ("squad", "chat", "text")
REQUIRED_COLUMNS: dict[str | None, tuple[str, ...]] = {
    None: ("input_ids",),
    "squad": ("context", "question", "answers"),
    "chat": ("messages",),
    "text": ("text",),
}
IGNORE_INDEX = -100
Formatting = str | Callable[[dict[str, Any], Any], dict[str, Any]] | None
BatchFn = Callable[[dict[str, list], list[int]], dict[str, list]]


def check_formatting(formatting: Formatting) -> None:
    """Reject an unknown formatting name before any I/O."""
    if formatting is None or callable(formatting) or formatting in FORMATTINGS:
        return
    raise bad_value("formatting", formatting, f"one of None, {', '.join(map(repr, FORMATTINGS))} or a "
                                              "callable(example, tokenizer) -> dict with input_ids")


def check_columns(formatting: Formatting, columns: Sequence[str], split: str) -> None:
    """Raise if the split lacks a column the formatting reads."""
    if callable(formatting):
        return
    for col in REQUIRED_COLUMNS[formatting]:
        if col not in columns:
            name = "None (pre-tokenized)" if formatting is None else repr(formatting)
            raise ConfigError(f"formatting={name} needs a {col!r} column but split {split!r} has "
                              f"{list(columns)}: rename the column with .map(...) or pick another formatting")


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def finish_full(full: list[int], target_mask: Sequence[float], max_len: int, replies: int = -1) -> dict[str, Any]:
    """Shift a full token list (``input_ids=full[:-1]``, ``labels=full[1:]``) and truncate it to
    ``max_len`` positions. ``target_mask[i]`` says whether token ``full[i]`` is trained on."""
    targets = target_mask[1:]
    n = len(full) - 1
    full = full[: max_len + 1]
    return {"input_ids": full[:-1], "labels": full[1:], "loss_mask": targets[:max_len],
            "prompt_len": _first_nonzero(targets), "full_len": n, "replies": replies}


def finish_shifted(input_ids: list[int], labels: list[int], loss_mask: list[float], max_len: int,
                   pad_id: int) -> dict[str, Any]:
    """Truncate an already shifted sample; labels equal to -100 are masked out (and set to pad)."""
    if IGNORE_INDEX in labels:
        loss_mask = [0 if y == IGNORE_INDEX else m for y, m in zip(labels, loss_mask, strict=True)]
        labels = [pad_id if y == IGNORE_INDEX else y for y in labels]
    return {"input_ids": input_ids[:max_len], "labels": labels[:max_len], "loss_mask": loss_mask[:max_len],
            "prompt_len": _first_nonzero(loss_mask), "full_len": len(input_ids), "replies": -1}


def _first_nonzero(values: Iterable[Any]) -> int:
    """Index of the first truthy value, -1 if none (``compress`` scans in C)."""
    return next(compress(count(), values), -1)


def _collect(rows: list[dict[str, Any]]) -> dict[str, list]:
    keys = ("input_ids", "labels", "loss_mask", "prompt_len", "full_len", "replies")
    return {k: [r[k] for r in rows] for k in keys}


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer: Any, formatting: str) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"formatting={formatting!r} appends EOS but tokenizer {_name(tokenizer)!r} has no "
                          "eos_token: set tokenizer.eos_token or pre-tokenize with formatting=None")
    return tokenizer.eos_token_id


def _first_answer(answers: Any, row: int) -> str:
    """The first answer text of a SQuAD ``answers`` field (dict with 'text', list or string)."""
    texts = answers.get("text") if isinstance(answers, dict) else answers
    if isinstance(texts, str):
        return texts
    if not texts:
        raise ConfigError(f"formatting='squad': row {row} has no answer text (answers={answers!r}): drop "
                          "unanswerable rows before training (e.g. with .map on a filtered Dataset)")
    return texts[0]


def squad_formatter(tokenizer: Any, max_len: int) -> BatchFn:
    """SQuAD: prompt ``Context: .. Question: .. Answer:``, loss on `` answer`` + EOS only."""
    eos, bos = _eos(tokenizer, "squad"), _bos(tokenizer)

    def fmt(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        pairs = zip(batch["context"], batch["question"], strict=True)
        prompts = [f"Context: {c} Question: {q} Answer:" for c, q in pairs]
        answers = [" " + _first_answer(a, i).strip() for a, i in zip(batch["answers"], idx, strict=True)]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        rows = []
        for p, a in zip(p_ids, a_ids, strict=True):
            prompt = bos + p
            rows.append(finish_full(prompt + a + [eos], [0] * len(prompt) + [1] * (len(a) + 1), max_len, 1))
        return _collect(rows)

    return fmt


def text_formatter(tokenizer: Any, max_len: int) -> BatchFn:
    """Pretraining text: BOS (if any) + text + EOS, loss on every token."""
    eos, bos = _eos(tokenizer, "text"), _bos(tokenizer)

    def fmt(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        rows = []
        for t in ids:
            full = bos + t + [eos]
            rows.append(finish_full(full, [0] * len(bos) + [1] * (len(full) - len(bos)), max_len))
        return _collect(rows)

    return fmt


def chat_tokens(messages: list[dict[str, Any]], tokenizer: Any, row: int = 0) -> tuple[list[int], list[int]]:
    """Render a conversation with the chat template; return its tokens and a 0/1 mask marking
    assistant turns (content plus the end-of-turn tokens the template emits after it).

    The rendered text is cut at each assistant turn's start (the prefix rendered with
    ``add_generation_prompt=True``) and end (the prefix including the turn); the pieces are
    tokenized separately, so the prompt tokenizes exactly as it does at generation time, where
    the model continues after the generation prompt.
    """
    def render(msgs: list, gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    try:
        full = render(messages, False)
        cuts = [c for i in turns for c in (render(messages[:i], True), render(messages[: i + 1], False))]
    except Exception as e:  # jinja2 TemplateError, KeyError, ...
        raise ConfigError(f"formatting='chat': the chat template of {_name(tokenizer)!r} failed on row "
                          f"{row}: {type(e).__name__}: {e}") from e
    bounds = [len(c) for c in cuts] + [len(full)]
    if any(not full.startswith(c) for c in cuts) or bounds != sorted(bounds):
        raise ConfigError(
            f"formatting='chat': the chat template of {_name(tokenizer)!r} does not render row {row} "
            "as a growing prefix (a conversation prefix renders differently from the start of the whole "
            "conversation), so assistant turns cannot be located: pre-tokenize with formatting=None")
    pieces = [full[a:b] for a, b in zip([0, *bounds[:-1]], bounds)]
    ids = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    tokens: list[int] = []
    mask: list[int] = []
    for k, piece in enumerate(ids):  # odd pieces are assistant turns
        tokens += piece
        mask += [k % 2] * len(piece)
    return tokens, mask


def chat_formatter(tokenizer: Any, max_len: int) -> BatchFn:
    """Chat ``messages`` through the tokenizer's chat template, loss on assistant turns only."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"formatting='chat' needs a chat template but tokenizer {_name(tokenizer)!r} "
                          "has none: use an instruct model's tokenizer, set tokenizer.chat_template, or "
                          "pick another formatting")

    def fmt(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        rows = []
        for messages, i in zip(batch["messages"], idx, strict=True):
            full, mask = chat_tokens(list(messages), tokenizer, i)
            rows.append(finish_full(full, mask, max_len, count_replies({"messages": list(messages)})))
        return _collect(rows)

    return fmt


def count_replies(example: dict[str, Any]) -> int:
    """Assistant turns of a row's ``messages`` column; -1 when the row has none to count."""
    messages = example.get("messages")
    if not isinstance(messages, list | tuple):
        return -1
    return sum(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)


def pretokenized_row(example: dict[str, Any], row: int, max_len: int, pad_id: int,
                     where: str = "formatting=None") -> dict[str, Any]:
    """Normalize a row that carries ``input_ids`` (+ optional shifted ``labels`` / ``loss_mask``).

    With only ``input_ids`` the row is shifted here; a ``loss_mask`` without ``labels`` is read
    per token of ``input_ids`` (1 = train on this token).
    """
    ids, labels, mask = example.get("input_ids"), example.get("labels"), example.get("loss_mask")
    if not ids:
        raise ConfigError(f"{where}: row {row} has no input_ids (got {ids!r}): every row needs a token list")
    ids = list(ids)
    if labels is None:
        target = list(mask) if mask is not None else [1] * len(ids)
        if len(target) != len(ids):
            raise ConfigError(f"{where}: row {row} has {len(ids)} input_ids but {len(target)} "
                              "loss_mask values")
        return finish_full(ids, target, max_len)
    labels = list(labels)
    mask = list(mask) if mask is not None else [1.0] * len(ids)
    if not len(ids) == len(labels) == len(mask):
        raise ConfigError(f"{where}: row {row} has {len(ids)} input_ids, {len(labels)} labels and "
                          f"{len(mask)} loss_mask values: already shifted rows need equal lengths")
    return finish_shifted(ids, labels, mask, max_len, pad_id)


def pretokenized_formatter(max_len: int, pad_id: int) -> BatchFn:
    """Rows already tokenized (NeMo style: ``labels`` and ``loss_mask`` already shifted)."""

    def fmt(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        keys = list(batch)
        rows = []
        for j, i in enumerate(idx):
            example = {k: batch[k][j] for k in keys}
            rows.append({**pretokenized_row(example, i, max_len, pad_id), "replies": count_replies(example)})
        return _collect(rows)

    return fmt


def callable_formatter(fn: Callable, tokenizer: Any, max_len: int, pad_id: int) -> BatchFn:
    """A user function ``fn(example, tokenizer) -> dict`` returning a pre-tokenized row."""
    where = f"formatting={getattr(fn, '__name__', fn)!r}"

    def fmt(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        keys, rows = list(batch), []
        for j, i in enumerate(idx):
            example = {k: batch[k][j] for k in keys}
            out = fn(example, tokenizer)
            if not isinstance(out, dict):
                raise ConfigError(f"{where} returned {type(out).__name__} for row {i}: return a dict "
                                  "with input_ids")
            rows.append({**pretokenized_row(out, i, max_len, pad_id, where), "replies": count_replies(example)})
        return _collect(rows)

    return fmt


def make_formatter(formatting: Formatting, tokenizer: Any, max_len: int, pad_id: int) -> BatchFn:
    """The batched formatter for a formatting value (see ``HFDatasetDataModule``)."""
    check_formatting(formatting)
    if callable(formatting):
        return callable_formatter(formatting, tokenizer, max_len, pad_id)
    if formatting is None:
        return pretokenized_formatter(max_len, pad_id)
    if tokenizer is None:
        raise ConfigError(f"formatting={formatting!r} tokenizes text: pass a tokenizer to setup(tokenizer)")
    builders = {"squad": squad_formatter, "chat": chat_formatter, "text": text_formatter}
    return builders[formatting](tokenizer, max_len)
