"""Training curves of one or more runs, one panel per term, runs overlaid.

    python -m ov3.tools.plot --workdir runs/full --workdir runs/only_und [--label full --label only_und]
        --out curves.png [--keys loss/contrastive,eval/retrieval/i2t_R@1]

Reads each DIR/metrics.jsonl (rows merged per step, the last value of a key wins: a resumed run
can log a step twice, and evaluations arrive in rows of their own) and draws every loss term
(`loss`, `loss/*`), every evaluation metric (`eval/*`; timings and example counts left out),
the diagnostics (`stats/*`) and the temperature over steps. Needs matplotlib
(`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from typing import Sequence

from ov3 import metrics as metrics_lib
from ov3.errors import Ov3Error

PREFIXES = ("loss/", "eval/", "stats/")
SINGLE = ("loss", "temperature")


def read_run(workdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...] sorted by step} of the keys this tool draws."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise Ov3Error(f"{path} does not exist: --workdir must be a training run's directory.")
    by_step: dict[int, dict[str, float]] = {}
    for row in metrics_lib.read_jsonl(path):
        by_step.setdefault(int(row["step"]), {}).update(row)
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if plotted(key) and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((step, float(value)))
    return series


def plotted(key: str) -> bool:
    # Timings, example counts and skip counts of evaluations are bookkeeping, not curves.
    return ((key in SINGLE or key.startswith(PREFIXES)) and not key.endswith("/time_s")
            and "/num_" not in key and "/skipped/" not in key)


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], out: str | pathlib.Path,
         keys: Sequence[str] | None = None) -> list[str]:
    """Write the figure to `out`; returns the panel keys in order."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    present = sorted({k for series in runs.values() for k in series}, key=_order)
    if keys:
        missing = [k for k in keys if k not in present]
        if missing:
            raise Ov3Error(f"--keys {missing} are in none of the runs; they have {present}.")
        present = list(keys)
    if not present:
        raise Ov3Error("the runs logged nothing to plot (no loss, eval or stats keys).")
    cols = min(4, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for label, series in runs.items():
            if key in series:
                steps, values = zip(*series[key])
                # Evaluations are a few points: markers make them visible.
                ax.plot(steps, values, label=label, marker="o" if len(steps) < 8 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return present


def _order(key: str) -> tuple[int, str]:
    """Losses first, then stats and temperature, then evaluations."""
    rank = 0 if key.startswith("loss") else 2 if key.startswith("eval/") else 1
    return rank, key


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", action="append", required=True, help="a run directory (repeat for more runs)")
    p.add_argument("--label", action="append", help="legend label of each --workdir (default: its name)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--keys", default="", help="comma-separated keys to draw (default: all)")
    args = p.parse_args(argv)
    try:
        labels = args.label or [pathlib.Path(w).name for w in args.workdir]
        if len(labels) != len(args.workdir):
            raise Ov3Error(f"{len(labels)} --label for {len(args.workdir)} --workdir: give one per run or none.")
        runs = {label: read_run(w) for label, w in zip(labels, args.workdir)}
        keys = plot(runs, args.out, [k for k in args.keys.split(",") if k] or None)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}: {len(keys)} panels, {len(runs)} runs")


if __name__ == "__main__":
    main()
