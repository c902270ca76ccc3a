"""Wall time of a recipe's ``--dryrun`` (interpreter start, imports, graph build, printing). Goals: <= 4 s, and
within 1.1x of a bare ``import nemo_run`` measured in the same run (the ratio holds on a busy machine).

    .venv/bin/python benchmarks/dryrun.py [--repeats 5] [--recipe recipes/smollm2_135m.py]

Each repeat runs the recipe file in a fresh interpreter, as a user would. The same run also
times ``python -c "import nemo_run"`` (NeMo-Run alone, a floor no recipe can beat) and splits one
in-process dry run into phases, so a reading taken on a busy machine can be judged as a ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 4.0
GOAL_RATIO = 1.1  # dryrun / bare `import nemo_run`, whole processes, medians
PHASES = """
import time, sys
t0 = time.perf_counter()
import nemo_run
t1 = time.perf_counter()
sys.path.insert(0, {root!r})
import recipes.cli
from recipes import smollm2_135m
t2 = time.perf_counter()
graph = smollm2_135m.finetune_recipe()
t3 = time.perf_counter()
print(f"{{t1 - t0:.2f}} {{t2 - t1:.2f}} {{t3 - t2:.4f}}")
"""


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipe", default="recipes/smollm2_135m.py")
    args = parser.parse_args()
    py = sys.executable
    wall([py, args.recipe, "--dryrun"])  # warm the page cache and __pycache__
    dryrun, floor = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        dryrun.append(wall([py, args.recipe, "--dryrun"]))
        floor.append(wall([py, "-c", "import nemo_run"]))
    phases = subprocess.run([py, "-c", PHASES.format(root=str(ROOT))], capture_output=True, text=True,
                            cwd=ROOT).stdout.split()
    best, median = min(dryrun), statistics.median(dryrun)
    print(f"{args.recipe} --dryrun wall: best {best:.2f} s, median {median:.2f} s over {args.repeats} runs "
          f"(goal <= {GOAL_S:.0f} s: {'met' if best <= GOAL_S else 'NOT met'})")
    ratio = median / statistics.median(floor)
    print(f"python -c 'import nemo_run':   best {min(floor):.2f} s, median {statistics.median(floor):.2f} s "
          f"-> dryrun / nemo_run import = {ratio:.2f}x (goal <= {GOAL_RATIO}x: "
          f"{'met' if ratio <= GOAL_RATIO else 'NOT met'})")
    if len(phases) == 3:
        print(f"phases in one process: import nemo_run {phases[0]} s, import recipes {phases[1]} s, "
              f"build graph {float(phases[2]) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
