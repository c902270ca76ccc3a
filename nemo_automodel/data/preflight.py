"""Data preflight: what a data module will train on, checked from the tokenizer and data alone.

    report = preflight(data, tokenizer)      # formats the data exactly as training will (data.setup)
    print(report)                            # samples with trained tokens marked, lengths, packing, tokens/step
    report.raise_for_problems()              # one-line ConfigError when a reply cannot teach the model to stop

A *reply* is a run of trained (loss) tokens. Every reply that is not cut by truncation must train a
stop token: the tokenizer's EOS, the end-of-turn token the chat template writes after a reply (found
by rendering a probe conversation), the ``eos_token_id`` of a local ``generation_config.json``, or
one passed in ``stop_tokens``. A reply without one teaches a model that never stops.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemo_automodel.data.datamodule import HFDatasetDataModule
from nemo_automodel.data.rows import SampleStore
from nemo_automodel.data.sampler import epoch_order, rank_batches
from nemo_automodel.errors import ConfigError, check_int

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around trained tokens when the output is not a terminal
_GREEN, _RESET = "\x1b[1;32m", "\x1b[0m"
_PROBE = [{"role": "user", "content": "Say OK."}, {"role": "assistant", "content": "OK"}]


@dataclass(frozen=True)
class Segment:
    """Consecutive tokens of a sample that are all trained (``trained``) or all not."""

    text: str
    trained: bool


@dataclass
class PreflightReport:
    """What the preflight found; ``str()`` is the printed summary, ``to_html()`` a self-contained page."""

    samples: list[tuple[int, list[Segment], bool]]  # (row of the split, segments, truncated)
    full_len: np.ndarray
    max_len: int
    rows_in: int
    dropped_truncated: int
    dropped_no_reply: int
    replies: int
    stop_tokens: dict[int, str]
    missing_stop: list[int]  # rows with a complete reply that trains no stop token
    masked_replies: list[int]  # rows with an assistant turn that has no trained token at all (a warning)
    truncated_replies: int  # replies cut by truncation (they lose their stop token)
    packing: str
    tokens_per_step: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise one ``ConfigError`` line naming the first problem (and how many there are)."""
        if self.problems:
            more = f" (+{len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise ConfigError(f"data preflight: {self.problems[0]}{more}")

    def render(self, color: bool = False) -> str:
        lines = ["== data preflight =="]
        for index, segments, truncated in self.samples:
            lines.append(f"-- row {index}" + (f" (truncated at {self.max_len} tokens)" if truncated else "")
                         + " --")
            lines.append(_marked(segments, color) + (" …" if truncated else ""))
        marker = "green" if color else f"{MARK_OPEN}…{MARK_CLOSE}"
        lines += [f"(trained tokens in {marker})", "", "lengths before truncation (tokens):",
                  *_histogram(self.full_len, self.max_len), ""]
        kept = self.rows_in - self.dropped_truncated - self.dropped_no_reply
        cut = int((self.full_len > self.max_len).sum())
        lines += [f"rows: {self.rows_in} in, {kept} trained on; truncated at {self.max_len} tokens: {cut}; "
                  f"dropped: {self.dropped_truncated} (truncation left no trained token), "
                  f"{self.dropped_no_reply} (nothing to train on)",
                  f"replies: {self.replies}; cut by truncation: {self.truncated_replies}; "
                  f"entirely masked: {len(self.masked_replies)}",
                  "stop tokens: " + (", ".join(f"{t!r} ({i})" for i, t in sorted(self.stop_tokens.items()))
                                     or "none known"),
                  "every complete reply trains a stop token: "
                  + ("yes" if not self.missing_stop else f"NO ({len(self.missing_stop)} rows, e.g. "
                                                          f"{self.missing_stop[:5]})"),
                  self.packing, self.tokens_per_step]
        if self.masked_replies:
            lines.append(f"WARNING: {len(self.masked_replies)} rows have fewer trained spans than assistant turns "
                         f"(rows {self.masked_replies[:5]}): a reply is entirely masked, intended only if the formatting masks it")
        lines += [f"PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render(color=False)

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page: the summary and every rendered sample."""
        body = []
        for index, segments, truncated in self.samples:
            text = "".join(f'<span class="t">{html.escape(s.text)}</span>' if s.trained else html.escape(s.text)
                           for s in segments)
            note = f" (truncated at {self.max_len} tokens)" if truncated else ""
            body.append(f"<h3>row {index}{note}</h3><pre>{text}</pre>")
        summary = html.escape(self.render(color=False).split("(trained tokens in", 1)[1].split("\n", 1)[1])
        page = ("<!doctype html><meta charset='utf-8'><title>data preflight</title><style>"
                "body{font-family:sans-serif;max-width:70em;margin:auto}pre{white-space:pre-wrap;"
                "background:#f6f6f6;padding:.5em}.t{background:#bdf5bd}</style><h1>data preflight</h1>"
                "<p>Trained tokens are <span class='t'>highlighted</span>.</p>"
                f"{''.join(body)}<h2>summary</h2><pre>{summary}</pre>")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
        return out


def _marked(segments: list[Segment], color: bool) -> str:
    open_, close = (_GREEN, _RESET) if color else (MARK_OPEN, MARK_CLOSE)
    return "".join(f"{open_}{s.text}{close}" if s.trained else s.text for s in segments)


def _histogram(lengths: np.ndarray, max_len: int, bins: int = 8, width: int = 40) -> list[str]:
    if not len(lengths):
        return ["  (no rows)"]
    top = int(max(lengths.max(), 1))
    step = max(1, math.ceil(top / bins))
    edges = list(range(0, top + step, step))
    counts, _ = np.histogram(lengths, bins=[*edges[:-1], edges[-1] + 1])
    rows = []
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        bar = "#" * (math.ceil(width * n / counts.max()) if n else 0)
        flag = "  > max_len: truncated" if lo >= max_len else ("  (crosses max_len)" if hi > max_len else "")
        rows.append(f"  {lo:>7}-{hi - 1:<7} {n:>7} {bar}{flag}")
    return rows


# ---- stop tokens --------------------------------------------------------------------------------------
def stop_token_ids(tokenizer: Any, extra: Sequence[str | int] = ()) -> dict[int, str]:
    """Token ids that end a reply: EOS, the chat template's end-of-turn, a local generation config's EOS
    ids and ``extra`` (token strings or ids)."""
    ids = {tokenizer.eos_token_id} | set(_template_end_of_turn(tokenizer)) | set(_generation_eos(tokenizer))
    for token in extra:
        tid = token if isinstance(token, int) else tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ConfigError(f"stop_tokens: {token!r} is not a token of the tokenizer")
        ids.add(int(tid))
    ids.discard(None)
    return {int(i): tokenizer.convert_ids_to_tokens(int(i)) for i in ids}


def _template_end_of_turn(tokenizer: Any) -> list[int]:
    """The special tokens the chat template writes between a reply's text and the next turn."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        head = tokenizer.apply_chat_template(_PROBE[:1], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that fails on the probe is reported by the chat formatter itself
        return []
    if not text.startswith(head):
        return []
    after = text[len(head):].split("OK", 1)
    if len(after) != 2:
        return []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [t for t in tokenizer(after[1], add_special_tokens=False)["input_ids"] if t in special]


def _generation_eos(tokenizer: Any) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` beside a tokenizer loaded from a local folder."""
    path = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
    try:
        value = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError):
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


# ---- the analysis -------------------------------------------------------------------------------------
def _replies(store: SampleStore, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per reply (run of trained positions): its sample, whether it trains a stop token, whether it
    reaches the sample's end."""
    trained = store.loss_mask > 0
    sample_of = np.repeat(np.arange(len(store)), store.lengths)
    starts = trained.copy()
    starts[1:] &= ~trained[:-1] | (sample_of[1:] != sample_of[:-1])
    run = np.cumsum(starts) - 1
    n = int(starts.sum())
    has_stop = np.bincount(run[trained & np.isin(store.labels, stops)], minlength=n) > 0
    last = np.zeros(len(trained), dtype=bool)
    ends = store.offsets[1:][store.lengths > 0] - 1
    last[ends] = True
    at_end = np.bincount(run[trained & last], minlength=n) > 0
    return sample_of[starts], has_stop, at_end


def _segments(tokenizer: Any, store: SampleStore, i: int) -> list[Segment]:
    s = store.sample(i)
    tokens = [int(s["input_ids"][0]), *map(int, s["labels"])] if len(s["labels"]) else []
    trained = [False, *(s["loss_mask"] > 0)] if tokens else []
    out: list[Segment] = []
    start = 0
    for k in range(1, len(tokens) + 1):
        if k == len(tokens) or trained[k] != trained[start]:
            out.append(Segment(tokenizer.decode(tokens[start:k], skip_special_tokens=False), bool(trained[start])))
            start = k
    return out


def _padding_line(data: HFDatasetDataModule, lengths: np.ndarray, dp_size: int) -> str:
    rows = data.train_dataset
    if rows.bins is not None:
        size = data.packed_sequence_size
        eff = lengths.sum() / max(1, len(rows) * size)
        return (f"packing: {len(lengths)} samples into {len(rows)} rows of {size} tokens, "
                f"{eff:.1%} of each row holds tokens (the rest is padding)")
    mbs = data.micro_batch_size
    batches = rank_batches(epoch_order(len(lengths), 0, data.seed, data.shuffle), mbs, 0, 1)
    used = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return (f"padding: no packing; micro-batches of {mbs} rows are {used / max(1, padded):.1%} tokens "
            f"(first epoch's order){'; set packed_sequence_size to pack' if mbs > 1 else ''}")


def _tokens_line(data: HFDatasetDataModule, store: SampleStore, row_lengths: np.ndarray, dp_size: int) -> str:
    per_step = data.global_batch_size or data.micro_batch_size * dp_size
    rows = len(row_lengths)
    steps = rows // per_step
    mean_tokens = row_lengths.mean() * per_step if rows else 0
    mean_loss = store.loss_mask.sum() / max(1, rows) * per_step
    return (f"tokens per optimizer step: {per_step} rows x {row_lengths.mean() if rows else 0:.0f} tokens = "
            f"{mean_tokens:,.0f} input tokens, {mean_loss:,.0f} trained tokens (mean); "
            f"optimizer steps per epoch: {steps}")


def preflight(data: HFDatasetDataModule, tokenizer: Any, samples: int = 3, stop_tokens: Sequence[str | int] = (),
              dp_size: int = 1) -> PreflightReport:
    """Format ``data`` as training will (``data.setup``) and check what it would train on.

    Args:
        samples: how many samples to render with their trained tokens marked.
        stop_tokens: extra tokens that end a reply (strings or ids), besides those found.
        dp_size: data-parallel ranks, for the tokens per optimizer step.
    """
    check_int("samples", samples, 0)
    check_int("dp_size", dp_size, 1)
    data.setup(tokenizer, dp_rank=0, dp_size=dp_size)
    audit = data.audit("train")
    store = data.train_dataset.store
    stops = stop_token_ids(tokenizer, list(stop_tokens))
    sample_of, has_stop, at_end = _replies(store, np.fromiter(stops, dtype=np.int64))
    row = np.flatnonzero(audit.kept)  # kept sample -> row of the split
    cut = audit.truncated[row]
    complete = ~(at_end & cut[sample_of])
    missing = row[np.unique(sample_of[complete & ~has_stop])].tolist()
    found = np.bincount(sample_of, minlength=len(store))
    dropped = ~audit.kept
    dropped_cut = int((dropped & (audit.prompt_len >= 0)).sum())
    masked = sorted(row[(store.replies > 0) & (found < store.replies) & ~cut].tolist()
                    + np.flatnonzero(dropped & (audit.replies > 0) & ~audit.truncated).tolist())
    bins = data.train_dataset.bins  # packed rows: their lengths from the bins, without building each row
    row_lengths = np.array([store.lengths[b].sum() for b in bins]) if bins is not None else store.lengths
    report = PreflightReport(
        samples=[(int(row[i]), _segments(tokenizer, store, i), bool(cut[i])) for i in range(min(samples, len(store)))],
        full_len=audit.full_len, max_len=audit.max_len, rows_in=len(audit.kept), dropped_truncated=dropped_cut,
        dropped_no_reply=int(dropped.sum()) - dropped_cut, replies=len(sample_of), stop_tokens=stops,
        missing_stop=missing, masked_replies=masked, truncated_replies=int((~complete).sum()),
        packing=_padding_line(data, store.lengths, dp_size),
        tokens_per_step=_tokens_line(data, store, row_lengths, dp_size))
    names = ", ".join(repr(t) for t in stops.values()) or "none (the tokenizer has no EOS)"
    if missing:
        report.problems.append(
            f"{len(missing)} of {len(store)} rows have a reply whose end-of-turn/EOS token is not trained "
            f"(e.g. row {missing[0]}; stop tokens: {names}), so the model never learns to stop: fix the chat "
            "template or formatting so the reply's end-of-turn token is in the loss, or pass stop_tokens=")
    return report
