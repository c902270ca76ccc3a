"""Tokenizer loading with a pad token, and the small NeMo-style wrapper scripts expect."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from nemo_automodel.errors import ConfigError, first_line

if TYPE_CHECKING:  # transformers' tokenizers take ~1 s to import: load them when a job runs, not for --dryrun
    from transformers import PreTrainedTokenizerBase


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token.

    When the tokenizer has none, the EOS id is used for padding. That is safe here because the
    loss is masked by ``loss_mask`` (by position), never by token id, so EOS targets stay in the loss.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer {name_or_path!r} could not be loaded: {first_line(err)}") from err
    return ensure_pad_token(tok)


def ensure_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tok`` a pad token when it has none (its UNK, else its EOS); returns ``tok``."""
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


class TokenizerAdapter:
    """The subset of NeMo's ``AutoTokenizer`` wrapper that AutoModel scripts use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def text_to_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def ids_to_text(self, ids: list[int]) -> str:
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))  # one sequence: one string

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id
