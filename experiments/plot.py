"""Plots and tables from `steps.csv`: both arms' curves with a seed band, and the alpha/beta/epochs grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["grid_table", "plot_all", "summary_table"]

CURVES = [
    ("pass_at_1", "held-out pass@1"),
    ("pass_at_k", "held-out pass@k"),
    ("distinct_wrong", "distinct wrong answers / prompt"),
    ("top_wrong_repeat", "repeat rate of top wrong answer"),
    ("clusters_per_prompt", "error clusters / prompt (service)"),
    ("step_seconds", "wall time per step (s)"),
]
COLOURS = {"grpo": "tab:blue", "meds": "tab:red", "plain": "tab:grey"}
LABELS = {"grpo": "GRPO (observe-only)", "meds": "GRPO + MEDS", "plain": "GRPO, no client"}


def _main(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["group"] == "main"]


def plot_all(frame: pd.DataFrame, out: Path, steps_per_epoch: int) -> None:
    """Write comparison.png, summary.csv and grid.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = _main(frame)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (column, title) in zip(axes.flat, CURVES, strict=True):
        for arm in ("grpo", "meds", "plain"):
            rows = main[main["arm"] == arm]
            if rows.empty or rows[column].isna().all():
                continue
            by_step = rows.groupby("step")[column]
            mean, low, high = by_step.mean(), by_step.min(), by_step.max()
            epochs = mean.index / steps_per_epoch
            seeds = rows["seed"].nunique()
            ax.plot(epochs, mean.values, color=COLOURS[arm], label=f"{LABELS[arm]} ({seeds} seed{'s' * (seeds > 1)})")
            if seeds > 1:
                ax.fill_between(epochs, low.values, high.values, color=COLOURS[arm], alpha=0.2, linewidth=0)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("GRPO with and without MEDS (mean over seeds, band = min..max across seeds)")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)
    summary_table(frame, steps_per_epoch).to_csv(out / "summary.csv", index=False, float_format="%.4f")
    grid = grid_table(frame, steps_per_epoch)
    grid.to_csv(out / "grid.csv", index=False, float_format="%.4f")


def _at_epoch_end(frame: pd.DataFrame, steps_per_epoch: int) -> pd.DataFrame:
    ends = frame[frame["step"] % steps_per_epoch == 0].copy()
    ends["epochs"] = ends["step"] // steps_per_epoch
    return ends


def summary_table(frame: pd.DataFrame, steps_per_epoch: int) -> pd.DataFrame:
    """Per arm: the last step's metrics, mean and standard deviation over seeds, and median step time."""
    main = _main(frame)
    last = main[main["step"] == main.groupby(["arm", "seed"])["step"].transform("max")]
    metrics = ["pass_at_1", "pass_at_k", "distinct_wrong", "top_wrong_repeat", "planted", "clusters_per_prompt"]
    rows = []
    for arm, group in last.groupby("arm", sort=False):
        row: dict[str, object] = {"arm": arm, "seeds": group["seed"].nunique(), "step": int(group["step"].max())}
        for m in metrics:
            row[f"{m}_mean"] = group[m].mean()
            row[f"{m}_std"] = group[m].std(ddof=1) if len(group) > 1 else np.nan
        trained = main[(main["arm"] == arm) & (main["step"] > 0)]
        row["step_seconds_median"] = trained["step_seconds"].median()
        rows.append(row)
    return pd.DataFrame(rows)


def grid_table(frame: pd.DataFrame, steps_per_epoch: int) -> pd.DataFrame:
    """pass@1 / pass@k of every (alpha, beta) cell of the MEDS arm at each epoch, against the observe-only
    baseline at the same epoch and seeds (it does not depend on alpha and beta): mean and std over seeds."""
    ends = _at_epoch_end(frame[frame["epoch"].notna()], steps_per_epoch)
    meds = ends[ends["arm"] == "meds"]
    base = ends[(ends["arm"] == "grpo") & (ends["group"] == "main")]
    rows = []
    for (alpha, beta, epochs), cell in meds.groupby(["alpha", "beta", "epochs"]):
        ref = base[(base["epochs"] == epochs) & base["seed"].isin(cell["seed"])]
        if epochs == 0:
            continue
        rows.append({
            "alpha": alpha, "beta": beta, "epochs": epochs, "seeds": cell["seed"].nunique(),
            "pass_at_1": cell["pass_at_1"].mean(), "pass_at_1_std": cell["pass_at_1"].std(ddof=1),
            "pass_at_k": cell["pass_at_k"].mean(), "pass_at_k_std": cell["pass_at_k"].std(ddof=1),
            "baseline_pass_at_1": ref["pass_at_1"].mean(), "baseline_pass_at_k": ref["pass_at_k"].mean(),
            "delta_pass_at_1": cell["pass_at_1"].mean() - ref["pass_at_1"].mean(),
            "delta_pass_at_k": cell["pass_at_k"].mean() - ref["pass_at_k"].mean(),
        })  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="redraw the plots and tables from steps.csv")
    parser.add_argument("folder", type=Path, nargs="?", default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    config = json.loads((args.folder / "config.json").read_text())["experiment"]
    steps_per_epoch = -(-config["train_prompts"] // config["prompts_per_step"])
    plot_all(pd.read_csv(args.folder / "steps.csv"), args.folder, steps_per_epoch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
