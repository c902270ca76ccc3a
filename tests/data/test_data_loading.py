"""Sources, splits, recorded maps and the one-line errors for bad input."""

from __future__ import annotations

import json

import datasets
import pytest

from nemo_automodel.data import HFDatasetDataModule
from nemo_automodel.errors import ConfigError

ROWS = [{"input_ids": [i, i + 1, i + 2], "tag": f"r{i}"} for i in range(1, 7)]


def _first_tokens(dm: HFDatasetDataModule) -> list[int]:
    return [int(dm.train_dataset[i]["input_ids"][0]) for i in range(len(dm.train_dataset))]


def _write(path, kind: str, rows=ROWS) -> str:
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":  # CSV cannot hold lists: use text rows
        datasets.Dataset.from_list([{"text": f"row {r['tag']}"} for r in rows]).to_csv(str(path), index=False)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_local_files(tokenizer, tmp_path, kind):
    path = _write(tmp_path / f"data.{kind}", kind)
    fmt = "text" if kind == "csv" else None
    dm = HFDatasetDataModule(path, formatting=fmt, shuffle=False, cache_dir=str(tmp_path / "cache"))
    dm.setup(tokenizer)
    assert len(dm.train_dataset) == 6
    if kind == "csv":
        assert tokenizer.decode(dm.train_dataset[2]["labels"]) == "row r3<|im_end|>"
    else:
        assert _first_tokens(dm) == [1, 2, 3, 4, 5, 6]


def test_list_of_files_and_split_dict(tokenizer, tmp_path):
    a = _write(tmp_path / "a.jsonl", "jsonl", ROWS[:2])
    b = _write(tmp_path / "b.jsonl", "jsonl", ROWS[2:])
    dm = HFDatasetDataModule([a, b], shuffle=False, cache_dir=str(tmp_path / "cache"))
    dm.setup(tokenizer)
    assert _first_tokens(dm) == [1, 2, 3, 4, 5, 6]
    dm = HFDatasetDataModule({"train": b, "validation": a}, val_split="dev",
                             cache_dir=str(tmp_path / "cache"))
    dm.setup(tokenizer)
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2


def test_save_to_disk_folder(tokenizer, tmp_path):
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:4]),
                         test=datasets.Dataset.from_list(ROWS[4:])).save_to_disk(str(tmp_path / "dd"))
    dm = HFDatasetDataModule(str(tmp_path / "dd"), split="test", shuffle=False)
    dm.setup(tokenizer)
    assert _first_tokens(dm) == [5, 6]
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    dm = HFDatasetDataModule(tmp_path / "ds")
    dm.setup(tokenizer)
    assert len(dm.train_dataset) == 6


@pytest.mark.parametrize("alias", ["val", "valid", "dev", "eval", "validation"])
def test_split_aliases(tokenizer, alias):
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:4]),
                              validation=datasets.Dataset.from_list(ROWS[4:]))
    dm = HFDatasetDataModule(dd, val_split=alias, shuffle=False)
    dm.setup(tokenizer)
    assert _first_tokens(dm) == [1, 2, 3, 4]
    assert [int(dm.val_dataset[i]["input_ids"][0]) for i in range(2)] == [5, 6]


def test_alias_in_the_data_maps_to_canonical_name(tokenizer):
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:4]),
                              dev=datasets.Dataset.from_list(ROWS[4:]))
    dm = HFDatasetDataModule(dd, val_split="validation")
    dm.setup(tokenizer)
    assert len(dm.val_dataset) == 2


def test_split_slices_and_limit(tokenizer):
    ds = datasets.Dataset.from_list(ROWS)
    dm = HFDatasetDataModule(ds, split="train[:50%]", shuffle=False)
    dm.setup(tokenizer)
    assert _first_tokens(dm) == [1, 2, 3]
    dm = HFDatasetDataModule(ds, split="train[2:]", val_split="train[:2]", limit_samples=3, shuffle=False)
    dm.setup(tokenizer)
    assert _first_tokens(dm) == [3, 4, 5] and len(dm.val_dataset) == 2


def test_recorded_maps_applied_in_order(tokenizer):
    ds = datasets.Dataset.from_list([{"x": 3}, {"x": 4}])
    dm = HFDatasetDataModule(ds, shuffle=False)
    assert dm.map(lambda e: {"x": e["x"] * 10}) is dm  # chainable, nothing runs yet
    dm.map(lambda e: {"x": e["x"] + 1}).map(lambda e: {"input_ids": [e["x"], 0, 0]}, remove_columns=["x"])
    dm.setup(tokenizer)
    assert _first_tokens(dm) == [31, 41]  # (x*10)+1, not (x+1)*10


def test_setup_is_cached_and_len_available(tokenizer):
    dm = HFDatasetDataModule(datasets.Dataset.from_list(ROWS), micro_batch_size=2)
    dm.setup(tokenizer)
    rows = dm.train_dataset
    dm.setup(tokenizer)
    assert dm.train_dataset is rows and len(rows) == 6 and dm.micro_batches_per_epoch == 3


# ---- errors -------------------------------------------------------------------------------
def test_missing_local_file(tokenizer, tmp_path):
    dm = HFDatasetDataModule(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="nope.jsonl.*no such file"):
        dm.setup(tokenizer)


def test_malformed_jsonl_names_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_ids": [1, 2]}\n{"input_ids": [3, 4]}\n{"input_ids": [5, 6\n{"input_ids": [7]}\n')
    dm = HFDatasetDataModule(str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"bad\.jsonl line 3 is not valid JSON") as err:
        dm.setup(tokenizer)
    assert "\n" not in str(err.value)


def test_unknown_split_lists_available(tokenizer):
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(ROWS))
    dm = HFDatasetDataModule(dd, val_split="validation")
    with pytest.raises(ConfigError, match=r"val_split='validation'.*\['train', 'test'\]"):
        dm.setup(tokenizer)


def test_empty_split_named(tokenizer):
    dm = HFDatasetDataModule(datasets.Dataset.from_list(ROWS), split="train[6:]")
    with pytest.raises(ConfigError, match=r"split='train\[6:\]' has no rows"):
        dm.setup(tokenizer)


def test_too_few_rows_for_one_step(tokenizer):
    dm = HFDatasetDataModule(datasets.Dataset.from_list(ROWS), micro_batch_size=4)
    with pytest.raises(ConfigError, match="6 rows.*micro_batch_size\\*dp_size=8"):
        dm.setup(tokenizer, dp_rank=0, dp_size=2)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"micro_batch_size": 4, "global_batch_size": 10}, "global_batch_size=10.*micro_batch_size=4"),
    ({"micro_batch_size": 0}, "micro_batch_size=0"),
    ({"seq_length": 1}, "seq_length=1"),
    ({"packed_sequence_size": -1}, "packed_sequence_size=-1"),
    ({"split": "train[:"}, "split='train\\[:'"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HFDatasetDataModule("unused", **kwargs)


def test_global_batch_not_divisible_by_dp(tokenizer):
    dm = HFDatasetDataModule(datasets.Dataset.from_list(ROWS), micro_batch_size=1, global_batch_size=3)
    assert dm.accumulate_grad_batches == 3
    with pytest.raises(ConfigError, match="global_batch_size=3.*micro_batch_size=1 x dp_size=2 = 2"):
        dm.setup(tokenizer, dp_rank=0, dp_size=2)


def test_constructor_does_no_io(tmp_path):
    dm = HFDatasetDataModule(str(tmp_path / "not-there.jsonl"), formatting="squad")
    assert dm.accumulate_grad_batches is None and dm.state_dict() == {"epoch": 0, "batch_in_epoch": 0}


def test_hub_name_goes_to_load_dataset_with_canonical_split(tokenizer, monkeypatch):
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = HFDatasetDataModule("rajpurkar/squad", split="train[:4]", val_split="val[:2]", name="plain_text")
    dm.setup(tokenizer)
    assert calls == [("rajpurkar/squad", "train[:4]", {"name": "plain_text"}),
                     ("rajpurkar/squad", "validation[:2]", {"name": "plain_text"})]


def test_unreachable_hub_dataset_is_a_config_error(tokenizer):
    dm = HFDatasetDataModule("someone/no-such-dataset-here")
    with pytest.raises(ConfigError, match="someone/no-such-dataset-here.*could not load"):
        dm.setup(tokenizer)


def test_text_formatting_needs_a_tokenizer():
    dm = HFDatasetDataModule(datasets.Dataset.from_list([{"text": "hi"}]), formatting="text", pad_token_id=0)
    with pytest.raises(ConfigError, match="formatting='text'.*tokenizer"):
        dm.setup(None)


def test_shifted_rows_with_unequal_lengths(tokenizer):
    ds = datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [2, 3]}])
    with pytest.raises(ConfigError, match="row 0 has 3 input_ids, 2 labels"):
        HFDatasetDataModule(ds).setup(tokenizer)
