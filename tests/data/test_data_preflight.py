"""The data preflight: trained tokens marked, end-of-turn proven in the loss, truncation and packing counted."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import chat_dataset

from nemo_automodel.data import HFDatasetDataModule, preflight
from nemo_automodel.data.preflight import MARK_CLOSE, MARK_OPEN
from nemo_automodel.errors import ConfigError

# ChatML that writes <|im_end|> at the start of the *next* message instead of after each one: every
# prefix still renders as a prefix, so nothing fails at formatting, but no reply trains its end-of-turn.
LATE_END_OF_TURN = ("{% for m in messages %}{% if not loop.first %}<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n"
                    "{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n"
                    "{% endif %}")
TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
             {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


def _positions(tokenizer, messages) -> int:
    """Training positions of a rendered conversation (tokens - 1)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


@pytest.fixture()
def late_eot_tokenizer(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = LATE_END_OF_TURN
    return broken


def _chat_data(rows, **kwargs) -> HFDatasetDataModule:
    from datasets import Dataset

    kwargs.setdefault("micro_batch_size", 1)
    return HFDatasetDataModule(Dataset.from_list([{"messages": m} for m in rows]), formatting="chat",
                               shuffle=False, **kwargs)


def test_trained_tokens_are_marked_token_by_token(tokenizer):
    report = preflight(_chat_data([TWO_TURNS]), tokenizer, samples=1)
    (row, segments, truncated), = report.samples
    assert (row, truncated) == (0, False)
    trained = [s.text for s in segments if s.trained]
    assert trained == ["Hello there.<|im_end|>\n", "Blue.<|im_end|>\n"]  # each reply + its end-of-turn, nothing else
    assert "".join(s.text for s in segments) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    text = str(report)
    assert f"{MARK_OPEN}Hello there.<|im_end|>\n{MARK_CLOSE}" in text and "\x1b[" not in text
    assert "\x1b[1;32mBlue." in report.render(color=True)
    assert report.ok and report.replies == 2 and report.stop_tokens == {2: "<|im_end|>"}


def test_real_smollm2_chat_data_passes(tokenizer):
    from nemo_automodel.demo.assets import demo_chat_dataset

    data = HFDatasetDataModule(demo_chat_dataset(limit=400), formatting="chat", seq_length=256,
                               micro_batch_size=8, global_batch_size=8, packed_sequence_size=256)
    report = preflight(data, tokenizer)
    report.raise_for_problems()
    audit = data.audit()
    kept = int(audit.kept.sum())
    assert report.replies == kept  # one reply per kept chat, each found as one trained span
    assert report.missing_stop == [] and report.masked_replies == []
    assert report.rows_in == 400 and report.dropped_truncated == 400 - kept
    assert report.truncated_replies == int((audit.truncated & audit.kept).sum())
    assert "every complete reply trains a stop token: yes" in str(report)


def test_a_template_that_drops_end_of_turn_from_the_loss_fails(late_eot_tokenizer):
    data = _chat_data([TWO_TURNS[:2], TWO_TURNS])
    report = preflight(data, late_eot_tokenizer)
    assert not report.ok and report.missing_stop == [0, 1]
    assert [s.text for s in report.samples[0][1] if s.trained] == ["Hello there."]  # the reply, no <|im_end|>
    with pytest.raises(ConfigError, match=r"2 of 2 rows have a reply whose end-of-turn/EOS token is not trained "
                                          r"\(e\.g\. row 0; stop tokens: '<\|im_end\|>'\)") as err:
        report.raise_for_problems()
    assert "\n" not in str(err.value)


def test_stop_tokens_come_from_the_template_not_only_eos(tokenizer):
    """A tokenizer whose EOS is not the end-of-turn token (Llama-3 style): the template's token counts."""
    other = copy.deepcopy(tokenizer)
    other.eos_token = "<|endoftext|>"
    report = preflight(_chat_data([TWO_TURNS]), other)
    assert set(report.stop_tokens.values()) == {"<|endoftext|>", "<|im_end|>"}
    assert report.ok


def test_truncated_replies_are_counted_not_blamed(tokenizer):
    full = _positions(tokenizer, TWO_TURNS)
    data = _chat_data([TWO_TURNS, TWO_TURNS[:2]], seq_length=full - 2)  # cuts "<|im_end|>\n" off the last reply
    report = preflight(data, tokenizer)
    assert report.full_len.tolist() == [full, _positions(tokenizer, TWO_TURNS[:2])]
    assert report.ok and report.truncated_replies == 1 and report.samples[0][2] is True
    assert [s.text for s in report.samples[0][1] if s.trained][-1] == "Blue."
    assert f"truncated at {full - 2} tokens: 1" in str(report)


def test_a_formatting_that_masks_a_reply_is_flagged(tokenizer):
    from nemo_automodel.data import chat_tokens

    def last_turn_only(example, tok):
        ids, mask = chat_tokens(example["messages"], tok)
        last = max(i for i, m in enumerate(mask) if m and not mask[i - 1])  # the last reply's first token
        return {"input_ids": ids, "loss_mask": [0] * last + mask[last:]}

    data = HFDatasetDataModule(chat_dataset(1).add_item({"messages": TWO_TURNS}), formatting=last_turn_only,
                               micro_batch_size=1, shuffle=False)
    report = preflight(data, tokenizer)
    assert report.masked_replies == [len(data.train_dataset) - 1]  # only the two-turn row
    assert report.ok and "WARNING: 1 rows have fewer trained spans than assistant turns" in str(report)


def test_packing_and_tokens_per_step_are_exact(tokenizer):
    rows = [TWO_TURNS[:2]] * 6
    n = _positions(tokenizer, TWO_TURNS[:2])
    packed = preflight(_chat_data(rows, packed_sequence_size=2 * n + 1, global_batch_size=2), tokenizer)
    assert f"6 samples into 3 rows of {2 * n + 1} tokens, {2 * n / (2 * n + 1):.1%}" in packed.packing
    assert f"2 rows x {2 * n} tokens = {4 * n:,} input tokens" in packed.tokens_per_step
    assert "optimizer steps per epoch: 1" in packed.tokens_per_step  # 3 rows, 2 per step
    plain = preflight(_chat_data(rows, micro_batch_size=2), tokenizer, dp_size=3)
    assert "100.0% tokens" in plain.packing and f"6 rows x {n} tokens" in plain.tokens_per_step


def test_html_is_self_contained(tokenizer, tmp_path):
    page = preflight(_chat_data([TWO_TURNS]), tokenizer).to_html(tmp_path / "p.html").read_text()
    assert '<span class="t">Hello there.&lt;|im_end|&gt;\n</span>' in page
    assert "http" not in page and "<script" not in page


def test_finetune_preflight_fails_before_any_weights_load(late_eot_tokenizer, tiny_llama, tmp_path, capsys):
    from nemo_automodel import api
    from nemo_automodel.models import HFAutoModelForCausalLM
    from nemo_automodel.trainer import NeMoLogger, Trainer

    model = HFAutoModelForCausalLM(str(tiny_llama))
    model._tokenizer = late_eot_tokenizer
    log = NeMoLogger(log_dir=str(tmp_path), name="run")
    with pytest.raises(ConfigError, match="never learns to stop"):
        api.finetune(model, _chat_data([TWO_TURNS]), Trainer(max_steps=1, enable_progress_bar=False), log=log,
                     preflight=True)
    assert model.model is None and not log.run_dir.exists()
    assert "== data preflight ==" in capsys.readouterr().out


# ---- the command ---------------------------------------------------------------------------------------
def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from nemo_automodel.launch.preflight_cli import main
    from recipes.cli import plan_target

    code = main(list(args), resolve=plan_target)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_on_a_recipe_with_overrides(capsys, tiny_llama, tmp_path):
    rows = tmp_path / "chats.jsonl"
    chat_dataset(3).to_json(rows)
    code, out, err = _cli(capsys, str(tiny_llama), f"data.path_or_dataset={rows}", "data.formatting=chat",
                          "data.seq_length=40", "--samples", "1", "--html", str(tmp_path / "p.html"))
    assert code == 0, err
    assert "truncated at 40 tokens" in out and (tmp_path / "p.html").is_file()


@pytest.mark.parametrize("args, message", [
    (["--samples", "-1"], "samples=-1"),
    (["data.seq_length"], "not an option or a key=value override"),
    (["data.no_such_field=1"], "no_such_field"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, tiny_llama, args, message):
    code, out, err = _cli(capsys, str(tiny_llama), *args)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_nemo_command_is_registered():
    nemo = str(Path(sys.executable).parent / "nemo")
    out = subprocess.run([nemo, "automodel", "preflight", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "nemo automodel preflight" in out.stdout, out.stderr
