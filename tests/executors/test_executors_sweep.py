"""Sweep expansion: list-valued overrides -> cartesian product, names, summary table (pure functions)."""

from __future__ import annotations

import json

import pytest

from nemo_automodel.errors import ConfigError
from nemo_automodel.launch import sweep
from nemo_automodel.launch.experiment import Experiment, check_name


def _never_list(key: str) -> bool:
    return False


def test_list_overrides_become_axes_and_expand_to_the_cartesian_product():
    fixed, axes = sweep.find_axes(["trainer.max_steps=5", "optim.lr=[1e-4,3e-4]", "peft.dim=[8, 16]", "peft=lora"],
                                  _never_list)
    assert fixed == ["trainer.max_steps=5", "peft=lora"]
    assert axes == [sweep.Axis("optim.lr", ("1e-4", "3e-4")), sweep.Axis("peft.dim", ("8", "16"))]
    combos = sweep.expand(axes)
    assert combos == [{"optim.lr": "1e-4", "peft.dim": "8"}, {"optim.lr": "1e-4", "peft.dim": "16"},
                      {"optim.lr": "3e-4", "peft.dim": "8"}, {"optim.lr": "3e-4", "peft.dim": "16"}]
    names = [sweep.task_name(c) for c in combos]
    assert names == ["lr-1e-4_dim-8", "lr-1e-4_dim-16", "lr-3e-4_dim-8", "lr-3e-4_dim-16"]
    assert all(check_name(n) for n in names)
    assert sweep.expand([]) == [{}]


def test_a_list_attribute_takes_a_flat_list_and_sweeps_a_list_of_lists():
    holds = lambda key: key == "peft.target_modules"  # noqa: E731
    fixed, axes = sweep.find_axes(["peft.target_modules=[q_proj,v_proj]"], holds)
    assert fixed == ["peft.target_modules=[q_proj,v_proj]"] and axes == []
    fixed, axes = sweep.find_axes(["peft.target_modules=[[q_proj],[q_proj,v_proj]]"], holds)
    assert axes[0].values == ("[q_proj]", "[q_proj,v_proj]")


def test_items_keep_nested_brackets_and_quotes():
    assert sweep.split_list("[a, 'b,c', f(x=1,y=2), [1,2]]") == ["a", "'b,c'", "f(x=1,y=2)", "[1,2]"]


@pytest.mark.parametrize("arg,reason", [
    ("optim.lr=[1e-4,3e-4", "malformed"),
    ("optim.lr=[]", "empty"),
    ("optim.lr=[1e-4,,3e-4]", "empty item"),
    ("optim.lr=[1e-4,(3e-4]", "unbalanced"),
    ("optim.lr=['a,b]", "unbalanced"),
    ("optim.lr=[1e-4,1e-4]", "repeats"),
    ("optim..lr=[1,2]", "dotted attribute path"),
])
def test_malformed_sweep_lists_are_one_line_errors(arg, reason):
    with pytest.raises(ConfigError, match=reason) as err:
        sweep.find_axes([arg], _never_list)
    assert "\n" not in str(err.value)


def test_the_same_key_twice_is_an_error():
    with pytest.raises(ConfigError, match="given twice"):
        sweep.find_axes(["a.b=[1,2]", "a.b=[3,4]"], _never_list)


def test_task_names_are_safe_even_for_shell_metacharacters():
    name = sweep.task_name({"log.name": "x$(touch /tmp/pwned)", "lr": "1e-4"})
    assert check_name(name) == name and "$" not in name and "(" not in name and " " not in name
    # ambiguous short keys fall back to the full key
    assert sweep.task_name({"a.dim": "1", "b.dim": "2"}) == "a-dim-1_b-dim-2"


def test_summary_reads_the_last_value_of_each_metric(tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    run_a.mkdir()
    rows = [{"step": 1, "train_loss": 2.0, "lr": 1e-4}, {"step": 2, "train_loss": 1.5, "lr": 1e-4},
            {"step": 2, "val_loss": 1.7}]
    (run_a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table_rows = sweep.summary_rows([("a", {"optim.lr": "1e-4"}, "SUCCEEDED", run_a),
                                     ("b", {"optim.lr": "3e-4"}, "FAILED", run_b)])
    assert table_rows[0]["train_loss"] == 1.5 and table_rows[0]["val_loss"] == 1.7 and table_rows[0]["step"] == 2
    assert table_rows[1]["train_loss"] is None and table_rows[1]["status"] == "FAILED"
    table = sweep.summary_table(table_rows).splitlines()
    assert table[0].split("|")[1].strip() == "task" and "optim.lr" in table[0] and "train_loss" in table[0]
    assert "1.5" in table[2] and "FAILED" in table[3] and " - " in table[3]
    assert len({len(line) for line in table}) == 1  # aligned columns


def test_python_sweeps_name_tasks_and_runs_like_the_cli(nemorun_home):
    from recipes import hf_auto_model_for_causal_lm as hf_recipe

    exp = Experiment("py-sweep")
    names = exp.add_sweep(hf_recipe.finetune_recipe(name="base"), {"optim.optimizer_fn.lr": [1e-4, 3e-4],
                                                                    "peft.dim": [8, 16]})
    assert names == ["lr-0.0001_dim-8", "lr-0.0001_dim-16", "lr-0.0003_dim-8", "lr-0.0003_dim-16"]
    dirs = exp.run_dirs()
    assert len(set(dirs.values())) == 4 and dirs["lr-0.0003_dim-16"].name == "base-lr-0.0003_dim-16"
    assert dirs["lr-0.0003_dim-16"].is_absolute()  # local executors share this filesystem
    task = exp._task("lr-0.0003_dim-16")["task"]
    assert task.optim.optimizer_fn.lr == 3e-4 and task.peft.dim == 16
    with pytest.raises(ConfigError, match="does not name an argument"):
        exp.add_sweep(hf_recipe.finetune_recipe(), {"optim.lrr": [1, 2]})
    with pytest.raises(ConfigError, match="used twice"):
        exp.add_sweep(hf_recipe.finetune_recipe(), {"optim.optimizer_fn.lr": [1e-4], "peft.dim": [8]})


def test_graphs_that_use_main_are_detected():
    import nemo_run as run

    from nemo_automodel.launch.experiment import _uses_main
    from recipes import hf_auto_model_for_causal_lm as hf_recipe

    def local_fn(x: int) -> int:
        return x

    local_fn.__module__ = "__main__"
    assert not _uses_main(hf_recipe.finetune_recipe())
    assert _uses_main(run.Partial(local_fn, 1))
    assert _uses_main(run.Partial(json.dumps, [run.Config(local_fn, 2)]))


def test_task_names_of_long_values_stay_short_and_distinct():
    long_a, long_b = "x" * 150 + "a", "x" * 150 + "b"
    a, b = sweep.task_name({"log.name": long_a}), sweep.task_name({"log.name": long_b})
    assert len(a) == len(b) == sweep.MAX_TASK_NAME and a != b and a.startswith("name-xxx")
