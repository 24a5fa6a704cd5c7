"""Figures of the growth experiment: compute saved to reach scratch's loss, losses at equal steps and compute."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["crossing", "markdown", "plot", "summarise"]

_ORDER = ("blocks", "width", "both")


def crossing(steps: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The first step at which the curve reaches `target`, linearly interpolated between evaluations; None if never."""
    if losses[0] <= target:
        return float(steps[0])
    for (s0, l0), (s1, l1) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
        if l1 <= target:
            return float(s0 + (l0 - target) / (l0 - l1) * (s1 - s0))
    return None


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def _paired(values: Sequence[float]) -> dict[str, Any]:
    # Negative is better for a loss difference: "ahead" counts the seeds where growing won.
    return {**(_stats(values) or {}), "ahead": sum(v < 0 for v in values), "seeds": len(values)}


def _seed_figures(child: dict[str, Any], parent: dict[str, Any], scratch: dict[str, Any], budget: int) -> dict:
    at, f_parent, f_child, f_scratch = child["at"], parent["flops_per_step"], child["flops_per_step"], \
        scratch["flops_per_step"]
    target = scratch["curve"]["loss"][-1]
    final = child["curve"]["loss"][-1]
    reached = crossing(child["curve"]["step"], child["curve"]["loss"], target)
    spent = at * f_parent + (budget - at) * f_child  # the grown run's whole compute
    equal = float(np.interp(spent / f_scratch, scratch["curve"]["step"], scratch["curve"]["loss"]))
    figures = {"step0_difference": abs(child["curve"]["loss"][0] - child["parent_loss"]),
               "final": final, "minus_parent": final - parent["curve"]["loss"][-1], "scratch_final": target,
               "equal_steps": final - target, "equal_compute": final - equal,
               "compute_share": spent / (budget * f_scratch), "reached": reached}
    if reached is not None:
        figures["steps_saved"] = 1 - reached / budget
        figures["flops_saved"] = 1 - (at * f_parent + (reached - at) * f_child) / (budget * f_scratch)
    return figures


def _row(arm: str, at: int, pairs: list[tuple[dict, dict, dict]], budget: int) -> dict[str, Any]:
    figures = [_seed_figures(child, parent, scratch, budget) for child, parent, scratch in pairs]
    got = [f for f in figures if f["reached"] is not None]
    child = pairs[0][0]
    return {
        "model": f"{arm}, grown at step {at}", "arm": arm, "at": at, "parameters": child["parameters"],
        "flops_per_step": child["flops_per_step"], "seeds": len(figures),
        "step0_difference_max": max(f["step0_difference"] for f in figures),
        "max_logit_gap": max(c["max_logit_gap"] for c, _, _ in pairs),
        "loss_final": _stats([f["final"] for f in figures]),
        "scratch_final": _stats([f["scratch_final"] for f in figures]),
        "minus_scratch_equal_steps": _paired([f["equal_steps"] for f in figures]),
        "minus_scratch_equal_compute": _paired([f["equal_compute"] for f in figures]),
        "minus_parent": _paired([f["minus_parent"] for f in figures]),
        "compute_share": _stats([f["compute_share"] for f in figures]),
        "reached": len(got),
        "steps_to_scratch_loss": _stats([f["reached"] for f in got]),
        "steps_saved": _stats([f["steps_saved"] for f in got]),
        "flops_saved": _stats([f["flops_saved"] for f in got]),
    }


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row for the parent, and per arm one for scratch and one per growth point (figures paired by seed)."""
    budget = results["config"]["steps"]
    parents = {g["seed"]: g["parent"] for g in results["grown"]}
    scratch = {(s["arm"], s["seed"]): s for s in results["scratch"]}
    rows: list[dict[str, Any]] = [{
        "model": "parent, no growth", "arm": None, "parameters": next(iter(parents.values()))["parameters"],
        "flops_per_step": next(iter(parents.values()))["flops_per_step"], "seeds": len(parents),
        "loss_final": _stats([p["curve"]["loss"][-1] for p in parents.values()])}] if parents else []
    arms = sorted({s["arm"] for s in results["scratch"]}, key=_ORDER.index)
    for arm in arms:
        runs = [s for s in results["scratch"] if s["arm"] == arm]
        rows.append({"model": f"{arm}, from scratch", "arm": arm, "parameters": runs[0]["parameters"],
                     "flops_per_step": runs[0]["flops_per_step"], "seeds": len(runs),
                     "loss_final": _stats([s["curve"]["loss"][-1] for s in runs])})
        for at in results["growth_steps"]:
            pairs = [(c, parents[g["seed"]], scratch[(arm, g["seed"])]) for g in results["grown"]
                     for c in g["children"] if c["arm"] == arm and c["at"] == at]
            if pairs:
                rows.append(_row(arm, at, pairs, budget))
    return rows


def _ms(s: dict[str, float] | None, scale: float = 1.0, digits: int = 3, sign: str = "") -> str:
    if not s:
        return ""
    return f"{scale * s['mean']:{sign}.{digits}f} ± {scale * s['std']:.{digits}f}"


def _row_text(row: dict[str, Any]) -> str:
    if "minus_scratch_equal_steps" not in row:
        return (f"| {row['model']} | {row['parameters']} | {row['flops_per_step'] / 1e9:.2f} | | "
                f"{_ms(row['loss_final'])} | | | | | | |")
    eq_steps, eq_compute = row["minus_scratch_equal_steps"], row["minus_scratch_equal_compute"]
    parent = row["minus_parent"]
    reached = f"{row['reached']}/{row['seeds']}"
    if row["reached"]:
        reached += f" at step {_ms(row['steps_to_scratch_loss'], digits=0)}"
    return (f"| {row['model']} | {row['parameters']} | {row['flops_per_step'] / 1e9:.2f} "
            f"| {row['step0_difference_max']:.1e} | {_ms(row['loss_final'])} "
            f"| {_ms(eq_steps, sign='+')} ({eq_steps['ahead']}/{eq_steps['seeds']}) "
            f"| {_ms(eq_compute, sign='+')} ({eq_compute['ahead']}/{eq_compute['seeds']}) at "
            f"{100 * row['compute_share']['mean']:.0f}% "
            f"| {_ms(parent, sign='+')} ({parent['ahead']}/{parent['seeds']}) "
            f"| {reached} | {_ms(row['steps_saved'], 100, 1)} | {_ms(row['flops_saved'], 100, 1)} |")


def corpus_text(results: dict[str, Any]) -> str:
    """The model and the data of a run on the standard-library corpus, for the text above its table."""
    corpus = results["corpus"]
    return (f"Byte-level GPT on the Python {results['versions']['python']} standard library "
            f"({corpus['train_bytes']} training bytes from {len(corpus['train_files'])} modules, "
            f"{corpus['validation_bytes']} validation bytes from {len(corpus['validation_files'])} others; "
            f"SHA-256 {corpus['sha256'][:16]}...).")


def markdown(results: dict[str, Any]) -> str:
    """The results table in Markdown, with the run's settings and data above it."""
    cfg = results["config"]
    lines = [
        f"{corpus_text(results)} Parent: {cfg['layers']} pre-norm blocks, width {cfg['width']}, "
        f"{cfg['heads']} heads, context {cfg['context']}. Budget {cfg['steps']} steps of {cfg['batch']} windows; "
        f"Adam (0.9, 0.95), lr {cfg['lr']}, warmup {cfg['warmup']:.0%}, cosine to {cfg['floor']:.0%}; a grown model "
        f"re-warms over {cfg['rewarm']} steps. {len(cfg['seeds'])} seed(s); mean ± sample std; validation loss in "
        f"nats per byte over {cfg['validation_windows']} windows, evaluated every {cfg['eval_every']} steps. "
        "Differences are grown minus scratch (or minus the parent trained on without growing, over the same "
        "steps), paired by seed (seeds where growing was ahead in brackets); equal compute compares with scratch "
        "at the FLOPs the grown run spent in all (its share of scratch's in %). "
        "Saved: the share of scratch's steps and FLOPs that the grown run (parent and child together) did not need "
        "to reach scratch's final loss.",
        "",
        "| model | params | GFLOPs/step | step-0 loss − parent's | final loss | − scratch, equal steps "
        "| − scratch, equal compute | − parent, no growth | reached scratch's loss | steps saved % | FLOPs saved % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row_text(row) for row in results["rows"]]
    for arm, reason in results["arms_not_run"].items():
        lines.append(f"| {arm}: not run ({reason}) | | | | | | | | | | |")
    lines.append("")
    lines.append(f"Run time: {results['seconds']:.0f} s with {results['workers']} worker(s) on {cfg['device']}; "
                 f"{results.get('cpu_seconds', 0):.0f} s of CPU time in all.")
    return "\n".join(lines) + "\n"


def _band(ax: Any, runs: list[dict[str, Any]], x_of: Any, color: str, label: str, style: str = "-") -> None:
    x = x_of(runs[0], np.asarray(runs[0]["curve"]["step"], dtype=float))
    losses = np.asarray([r["curve"]["loss"] for r in runs])
    ax.plot(x, losses.mean(0), style, color=color, label=label, lw=1.3)
    ax.fill_between(x, losses.min(0), losses.max(0), color=color, alpha=0.18, lw=0)


def plot(results: dict[str, Any], path: Path) -> None:
    """Validation loss against steps (top) and against training FLOPs (bottom), one column per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({s["arm"] for s in results["scratch"]}, key=_ORDER.index) or ["(none)"]
    fig, axes = plt.subplots(2, len(arms), figsize=(max(6.4, 4.6 * len(arms)), 6.4), squeeze=False)
    parents = {g["seed"]: g["parent"] for g in results["grown"]}
    blues = ("tab:blue", "tab:cyan", "tab:purple", "tab:green")
    # Zoom on where the runs differ: from a little above the parent's loss at the first growth point.
    starts = [c["curve"]["loss"][0] for g in results["grown"] for c in g["children"]]
    top = max(starts) + 0.3 if starts else None

    def steps(run: dict[str, Any], x: np.ndarray) -> np.ndarray:
        return x

    def flops(run: dict[str, Any], x: np.ndarray) -> np.ndarray:
        if "at" not in run:
            return x * run["flops_per_step"] / 1e12
        before = run["at"] * parents[run["seed"]]["flops_per_step"]
        return (before + (x - run["at"]) * run["flops_per_step"]) / 1e12

    for column, arm in enumerate(arms):
        for ax, x_of, xlabel in ((axes[0, column], steps, "steps"), (axes[1, column], flops, "training TFLOPs")):
            if parents:
                _band(ax, [{**p, "seed": s} for s, p in parents.items()], x_of, "0.55", "parent (no growth)", "--")
            scratch = [s for s in results["scratch"] if s["arm"] == arm]
            if scratch:
                _band(ax, scratch, x_of, "tab:red", "child architecture from scratch")
            for k, at in enumerate(results["growth_steps"]):
                grown = [{**c, "seed": g["seed"]} for g in results["grown"] for c in g["children"]
                         if c["arm"] == arm and c["at"] == at]
                if grown:
                    _band(ax, grown, x_of, blues[k % len(blues)], f"grown at step {at}")
            ax.set_title(f"{arm}", fontsize=9)
            if top is not None:
                ax.set_ylim(top=top)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("validation loss (nats/byte)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[0, column].legend(fontsize=7)
    fig.suptitle("byte-level GPT grown by onnxmorph vs the same architecture from scratch\n"
                 "(lines: mean, bands: min-max over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
