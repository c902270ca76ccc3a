"""tutorials/multinode_slurm.py runs end to end on the local cluster (1 node x 2 ranks) and is a percent notebook."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests.executors.cli_helpers import ROOT

TUTORIAL = ROOT / "tutorials" / "multinode_slurm.py"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.distributed
def test_multinode_tutorial_on_the_local_cluster(slurm_cluster, tiny_llama, tmp_path, nemorun_home):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(TUTORIAL), "--model", str(tiny_llama), "--max-steps", "3",
                           "--samples", "32", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout
    assert "#SBATCH --nodes=1" in out and "--nproc-per-node 2" in out  # the sbatch script was shown
    assert "{'multinode': 'SUCCEEDED'}" in out and "COMPLETED" in out  # exp.run() and sacct
    last = tmp_path / "out" / "multinode" / "checkpoints" / "last"
    assert (last / "trainer-rank1.pt").is_file() and (last / "hf_adapter").is_dir()
    assert "train loss:" in out and "| multinode " in out
    # the tutorial launches at module level: it must not run (and launch) again inside its own job
    logs = list((nemorun_home / "experiments" / "multinode-tutorial").glob("*/multinode/log-*.out"))
    assert len(logs) == 1 and "[default1]:" in logs[0].read_text() and "node(s) x" not in logs[0].read_text()


def test_multinode_tutorial_is_a_percent_notebook():
    cells, current = [], None
    for line in TUTORIAL.read_text().splitlines():
        if line.startswith("# %%"):
            current = ["markdown" if "[markdown]" in line else "code", []]
            cells.append(current)
        elif current is not None:
            current[1].append(line)
    kinds = [kind for kind, _ in cells]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 6 and kinds.count("code") >= 6
    for kind, lines in cells:
        source = "\n".join(lines).strip()
        assert source, f"empty {kind} cell"
        if kind == "markdown":
            assert all(line.startswith("#") for line in source.splitlines())
        else:
            ast.parse(source)
    assert len(TUTORIAL.read_text().splitlines()) < 400
