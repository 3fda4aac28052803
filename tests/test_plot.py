"""``coati.plot`` draws a run's curves: one panel per logged quantity holding exactly the logged steps and values,
saved as a PNG of the figure's size with ink in every panel. The logs here are shaped like the quick pipeline's
(``python -m coati.pipeline --quick``, also with ``--algo grpo`` / ``dpo``): same directories, splits and keys."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coati.errors import MissingDependencyError, MissingInputError
from coati.plot import figure, main, plot_run, plot_run_if_possible

ROOT = Path(__file__).resolve().parents[1]
SFT = [{"step": s, "split": "train", "loss": v, "lr": 1e-3, "grad_norm": 1.5, "epoch": s / 350}
       for s, v in [(100, 1.03), (200, 0.72), (300, 0.6), (400, 0.45)]]
RM_TRAIN = [{"step": s, "split": "train", "loss": 0.3, "lr": 7e-4, "grad_norm": 0.3, "acc": v, "margin": 2.0,
             "epoch": s / 393} for s, v in [(100, 0.75), (200, 0.90625), (300, 0.875)]]
RM_EVAL = [{"step": s, "split": "eval", "loss": 0.1, "acc": v, "margin": 4.0} for s, v in [(150, 0.77), (300, 0.94)]]
PPO = [{"step": s, "split": "ppo", "critic/score/mean": score, "critic/score/std": 1.0, "actor/reward_kl_penalty": kl,
        "actor/kl_seq": 3 * kl, "actor/pg_loss": 0.0} for s, score, kl in [(16, 0.15, 0.012), (32, 0.34, 0.03),
                                                                          (48, 0.27, -0.01)]]
SUMMARY = {"seed": 42, "preset": "quick", "algo": "ppo", "sft_accuracy": 0.57, "sft_accuracy_greedy": 0.99,
           "rm_accuracy": 1.0, "rm_margin": 15.3, "ppo_accuracy": 0.7525, "ppo_accuracy_greedy": 0.995,
           "models": {"sft": "sft", "reward_model": "rm", "ppo": "ppo"}}


def _write(run: Path, stage: str, records: list[dict]) -> None:
    (run / stage).mkdir(parents=True, exist_ok=True)
    (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def run(tmp_path) -> Path:
    """A pipeline output dir: sft/, rm/, ppo/ logs, data/ without one, and summary.json."""
    _write(tmp_path, "sft", SFT)
    _write(tmp_path, "rm", RM_TRAIN[:2] + RM_EVAL[:1] + RM_TRAIN[2:] + RM_EVAL[1:])
    _write(tmp_path, "ppo", PPO)
    (tmp_path / "data").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    return tmp_path


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def _series(records: list[dict], key: str) -> tuple[list, list]:
    return [r["step"] for r in records], [r[key] for r in records]


def test_each_panel_holds_the_logged_steps_and_values(run):
    axes = figure(run).axes
    assert [ax.get_title() for ax in axes] == ["sft: LM loss", "rm: reward model pair accuracy",
                                               "ppo: RL score (reward) per step", "ppo: RL KL to reference per step",
                                               "task accuracy per stage"]
    assert _lines(axes[0]) == {"train": _series(SFT, "loss")}  # the reward model's loss is no LM loss
    assert _lines(axes[1]) == {"train": _series(RM_TRAIN, "acc"), "eval": _series(RM_EVAL, "acc")}
    assert _lines(axes[2]) == {"ppo": _series(PPO, "critic/score/mean")}
    assert _lines(axes[3]) == {"ppo": _series(PPO, "actor/reward_kl_penalty")}
    assert axes[3].get_ylabel() == "actor/reward_kl_penalty"
    bars = axes[4]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["sft", "ppo"]  # rm_accuracy is a pair accuracy
    assert [b.get_height() for b in bars.containers[0]] == [0.57, 0.7525]
    assert [b.get_height() for b in bars.containers[1]] == [0.99, 0.995]


def test_png_is_the_figure_with_its_curves_in_every_panel(run):
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    fig = figure(run)
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    assert plot_run(run) == run / "curves.png"
    image = imread(run / "curves.png")
    assert image.shape[:2] == (height, width) == (680, 1440)  # 5 panels: 2 rows of 3
    first_color = np.abs(image[..., :3] - np.array(to_rgb("C0"))).max(axis=-1) < 0.02
    for ax in fig.axes:
        x0, y0, x1, y1 = ax.get_position().extents
        panel = first_color[round((1 - y1) * height) + 2:round((1 - y0) * height) - 2,
                            round(x0 * width) + 2:round(x1 * width) - 2]
        assert panel.sum() > 50, ax.get_title()  # each panel's first line (or bar) is drawn inside it
    assert not first_color[:, round(fig.axes[2].get_position().x1 * width) + 5:].any()  # the empty sixth cell


def test_preference_and_critic_free_logs_get_their_own_panels(tmp_path):
    dpo = [{"step": 100, "split": "train", "loss": 0.64, "rewards/accuracies": 1.0, "rewards/chosen": 0.04,
            "rewards/margins": 0.21, "rewards/rejected": -0.17},
           {"step": 200, "split": "eval", "loss": 0.67, "rewards/accuracies": 0.96, "rewards/margins": 0.17}]
    grpo = [{"step": s, "split": "ppo", "critic/score/mean": v, "actor/kl_loss": kl, "actor/ppo_kl": 0.0}
            for s, v, kl in [(24, 0.71, 0.016), (48, 0.82, 0.035)]]
    _write(tmp_path / "dpo_run", "dpo", dpo)
    _write(tmp_path / "grpo_run", "grpo", grpo)
    axes = figure(tmp_path / "dpo_run").axes
    assert [ax.get_title() for ax in axes] == ["dpo: preference reward accuracy", "dpo: preference reward margin"]
    assert _lines(axes[0]) == {"train": ([100], [1.0]), "eval": ([200], [0.96])}
    assert _lines(axes[1]) == {"train": ([100], [0.21]), "eval": ([200], [0.17])}
    axes = figure(tmp_path / "grpo_run").axes  # no summary.json: no accuracy panel
    assert [ax.get_ylabel() for ax in axes] == ["critic/score/mean", "actor/kl_loss"]
    assert _lines(axes[1]) == {"ppo": ([24, 48], [0.016, 0.035])}


def test_a_single_trainers_save_dir_and_the_pipelines_own_summary(run, tmp_path):
    """A trainer's --save_path holds metrics.jsonl itself; the pipeline draws before it writes summary.json, so
    the summary it passes wins over one on disk."""
    assert _lines(figure(run / "sft").axes[0]) == {"train": _series(SFT, "loss")}
    bars = figure(run, {"sft_accuracy": 0.5, "sft_accuracy_greedy": None}).axes[-1]
    assert [b.get_height() for c in bars.containers for b in c] == [0.5, 0.0]
    out = main([str(run), "--out", str(tmp_path / "elsewhere.png")])
    assert out == tmp_path / "elsewhere.png" and out.stat().st_size > 10_000


def test_cli_on_a_dir_without_logs_prints_one_error_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "coati.plot", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: nothing to draw in {tmp_path}: no metrics.jsonl with a loss, "
                                        f"accuracy, score or KL in it or its subdirectories (pass a run's "
                                        f"--save_path or --output_dir)"]
    with pytest.raises(MissingInputError):
        plot_run(tmp_path / "missing")


def test_without_matplotlib_the_error_names_the_extra_and_the_pipeline_goes_on(run, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'coati\[plot\]'") as err:
        plot_run(run)
    assert "\n" not in str(err.value)
    (run / "curves.png").write_bytes(b"an earlier run's")
    with caplog.at_level(logging.WARNING, logger="coati"):
        assert plot_run_if_possible(run, SUMMARY) is None
    assert [r.getMessage() for r in caplog.records] == ["no curves.png: drawing curves needs matplotlib: pip install "
                                                        "'coati[plot]' (matplotlib)"]
    assert not (run / "curves.png").exists()
