"""``python -m coati.plot RUN_DIR``: a run's curves in one PNG, because curves are read at a glance where logs are
not: every ``metrics.jsonl`` in RUN_DIR and its stage subdirectories, and each stage's task accuracy from
``summary.json``. ``python -m coati.pipeline`` draws its own ``curves.png``. Needs ``pip install 'coati[plot]'``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingDependencyError, MissingInputError
from .utils.config import Parser

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (title, keys) in pipeline order: a panel per metrics.jsonl logging one of the keys, a line per split. "loss" only
# where none of the others is logged (SFT): reward-model and DPO logs carry a loss too.
PANELS = (
    ("LM loss", ("loss",)),
    ("reward model pair accuracy", ("acc",)),
    ("preference reward accuracy", ("rewards/accuracies",)),
    ("preference reward margin", ("rewards/margins",)),
    ("RL score (reward) per step", ("critic/score/mean",)),
    ("RL KL to reference per step", ("actor/reward_kl_penalty", "actor/kl_loss")),
)
NEEDS_MATPLOTLIB = "drawing curves needs matplotlib: pip install 'coati[plot]' (matplotlib)"
Lines = dict[str, tuple[list[int], list[float]]]  # {split: (steps, values)}


def curves(run_dir: Path) -> list[tuple[str, str, Lines]]:
    """(title, metric key, lines) per panel, in :data:`PANELS` order."""
    run_dir = Path(run_dir)
    logs = sorted(p for p in [run_dir / "metrics.jsonl", *run_dir.glob("*/metrics.jsonl")] if p.is_file())
    records = {path: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
               for path in logs}
    not_lm = {k for _, keys in PANELS[1:] for k in keys}
    found = []
    for title, keys in PANELS:
        for path, rows in records.items():
            logged = set().union(*rows)
            key = next((k for k in keys if k in logged), None)
            if key is None or (key == "loss" and logged & not_lm):
                continue
            lines: Lines = {}
            for r in rows:
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]):
                    steps, values = lines.setdefault(r.get("split", "train"), ([], []))
                    steps.append(r["step"])
                    values.append(r[key])
            if lines:
                found.append((f"{path.parent.name}: {title}", key, lines))
    return found


def accuracies(summary: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """{stage: (sampled, greedy)} task accuracy from a pipeline summary (``<stage>_accuracy[_greedy]``)."""
    stages = {key.removesuffix("_accuracy_greedy"): summary[key] for key in summary if key.endswith("_accuracy_greedy")}
    return {stage: (summary.get(f"{stage}_accuracy"), greedy) for stage, greedy in stages.items()
            if summary.get(f"{stage}_accuracy") is not None or greedy is not None}


def figure(run_dir: Path, summary: dict[str, Any] | None = None) -> Figure:
    """The matplotlib Figure of :func:`plot_run`; ``summary`` defaults to RUN_DIR/summary.json."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(NEEDS_MATPLOTLIB) from None
    run_dir = Path(run_dir)
    panels = curves(run_dir)
    if not panels:
        raise MissingInputError(f"nothing to draw in {run_dir}: no metrics.jsonl with a loss, accuracy, score or "
                                f"KL in it or its subdirectories (pass a run's --save_path or --output_dir)")
    if summary is None and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    bars = accuracies(summary or {})
    n = len(panels) + bool(bars)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.8 * cols, 3.4 * rows), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas: no display or GUI backend needed
    for i, (title, key, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for split, (steps, values) in lines.items():
            ax.plot(steps, values, marker="." if len(steps) < 20 else None, label=split)
        ax.set(title=title, xlabel="step", ylabel=key)
        if len(lines) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    if bars:
        ax = fig.add_subplot(rows, cols, n)
        x = range(len(bars))
        for j, label in enumerate(("sampled", "greedy")):
            drawn = ax.bar([i + 0.4 * j - 0.2 for i in x], [v[j] or 0.0 for v in bars.values()], width=0.4,
                           label=label)
            ax.bar_label(drawn, labels=["-" if v[j] is None else f"{v[j]:.2f}" for v in bars.values()])
        ax.set_xticks(list(x), list(bars))
        ax.set(title="task accuracy per stage", ylabel="exact-match accuracy", ylim=(0, 1.3))
        ax.legend(loc="upper center", ncols=2)
    fig.tight_layout()
    return fig


def plot_run(run_dir: Path, out: Path | None = None, *, summary: dict[str, Any] | None = None) -> Path:
    """Draw RUN_DIR's curves into ``out`` (default RUN_DIR/curves.png) and return its path."""
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    figure(run_dir, summary).savefig(out)
    return out


def plot_run_if_possible(run_dir: Path, summary: dict[str, Any] | None = None) -> str | None:
    """:func:`plot_run` for a job that must not fail for want of matplotlib: None, and a line saying how to get it."""
    try:
        return str(plot_run(run_dir, summary=summary))
    except (MissingDependencyError, MissingInputError) as err:
        (Path(run_dir) / "curves.png").unlink(missing_ok=True)  # not an earlier run's curves beside this summary
        logging.getLogger("coati").warning("no curves.png: %s", err)
        return None


def main(argv: list[str] | None = None) -> Path:
    p = Parser(prog="python -m coati.plot", description="Draw a run's metrics.jsonl curves (and "
                                "summary.json accuracies) into one PNG.")
    p.add_argument("run_dir", type=Path, help="a run's --save_path / --output_dir (holding metrics.jsonl files)")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    out = plot_run(args.run_dir, args.out)
    print(f"curves: {out}")
    return out


if __name__ == "__main__":
    from .cli import run  # imported here: torch and transformers come with it, and a library import needs neither

    run(main)
