"""Figures of the MoE upcycling experiment: the upcycled arms against the dense parent at equal steps and compute."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxmorph.experiments.textgrowth_report import corpus_text

__all__ = ["equal_compute_loss", "markdown", "plot", "summarise"]


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def _paired(values: Sequence[float]) -> dict[str, Any]:
    # negative is better for a loss difference: "ahead" counts the seeds where the MoE won
    return {**(_stats(values) or {}), "ahead": sum(v < 0 for v in values), "seeds": len(values)}


def equal_compute_loss(dense: Sequence[dict[str, Any]], flops: float) -> tuple[float, float]:
    """(loss, ratio): the dense baseline's validation loss after `flops` of training since the growth point.

    From the shortest dense run that reaches `flops` (within 2%), read off its curve by linear
    interpolation in FLOPs (its last point when it ends a little short); `ratio` is that run's length.
    """
    runs = sorted(dense, key=lambda d: d["ratio"])
    run = next((d for d in runs if d["curve"]["flops"][-1] >= 0.98 * flops), runs[-1])
    x = np.asarray(run["curve"]["flops"], dtype=float)
    return float(np.interp(min(flops, x[-1]), x, run["curve"]["loss"])), float(run["ratio"])


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per dense baseline and one per arm, differences paired by seed."""
    seeds = results["seeds"]
    if not seeds:
        return []
    first = seeds[0]
    rows: list[dict[str, Any]] = [{
        "model": "dense parent, trained on", "kind": "parent", "parameters": first["parent"]["parameters"],
        "active_flops": first["parent"]["flops_per_step"], "dense_flops": first["parent"]["flops_per_step"],
        "seconds_per_step": _stats([s["parent"]["seconds_per_step"] for s in seeds]),
        "loss_final": _stats([s["parent"]["curve"]["loss"][-1] for s in seeds]), "seeds": len(seeds)}]
    for k, run in enumerate(first["dense"]):
        label = "dense parent, restarted at the growth point" if run["ratio"] == 1.0 else \
            f"dense parent, restarted, {run['ratio']:.2f}x the steps (equal compute with top-2)"
        rows.append({"model": label, "kind": "dense", "ratio": run["ratio"],
                     "parameters": first["parent"]["parameters"], "active_flops": first["parent"]["flops_per_step"],
                     "dense_flops": first["parent"]["flops_per_step"],
                     "loss_final": _stats([s["dense"][k]["curve"]["loss"][-1] for s in seeds]), "seeds": len(seeds)})
    for index, arm in enumerate(first["arms"]):
        runs = [s["arms"][index] for s in seeds]
        restarted = [next(d for d in s["dense"] if d["ratio"] == 1.0)["curve"]["loss"][-1] for s in seeds]
        spent = [r["curve"]["flops"][-1] for r in runs]
        equal = [equal_compute_loss(s["dense"], f) for s, f in zip(seeds, spent)]
        finals = [r["curve"]["loss"][-1] for r in runs]
        params = arm["params"]
        name = f"{arm['arm']}: {params['experts']} experts" + (f" from {params['shards']} shards, top-{params['top_k']}"
                                                                f" per shard" if params.get("shards", 1) > 1
                                                                else f", top-{params['top_k']}")
        name += f", {params.get('routing', 'topk-softmax')}"
        rows.append({
            "model": name, "kind": "moe", "arm": arm["arm"], "parameters": arm["parameters"],
            "active_flops": arm["active_flops_per_step"], "dense_flops": arm["dense_flops_per_step"],
            "seconds_per_step": _stats([r["seconds_per_step"] for r in runs]), "seeds": len(runs),
            "step0_difference_max": max(abs(r["curve"]["loss"][0] - r["parent_loss"]) for r in runs),
            "max_logit_gap": max(r["max_logit_gap"] for r in runs),
            "loss_final": _stats(finals),
            "minus_parent": _paired([f - s["parent"]["curve"]["loss"][-1] for f, s in zip(finals, seeds)]),
            "minus_restarted": _paired([f - d for f, d in zip(finals, restarted)]),
            "minus_equal_compute": _paired([f - e[0] for f, e in zip(finals, equal)]),
            "equal_compute_ratio": max(e[1] for e in equal),
            "router_moved": _stats([r["router_moved"] for r in runs]),
            "busiest_share": _stats([max(max(x) for x in r["load"]) for r in runs]),
        })
    return rows


def _ms(s: dict[str, float] | None, scale: float = 1.0, digits: int = 3, sign: str = "") -> str:
    if not s:
        return ""
    return f"{scale * s['mean']:{sign}.{digits}f} ± {scale * s['std']:.{digits}f}"


def _paired_text(p: dict[str, Any]) -> str:
    return f"{_ms(p, sign='+')} ({p['ahead']}/{p['seeds']})"


def _row_text(row: dict[str, Any]) -> str:
    seconds = _ms(row.get("seconds_per_step"), 1000, 0) if row.get("seconds_per_step") else ""
    head = (f"| {row['model']} | {row['parameters']} | {row['active_flops'] / 1e9:.2f} | "
            f"{row['dense_flops'] / 1e9:.2f} | {seconds} |")
    if row["kind"] != "moe":
        return head + f" | {_ms(row['loss_final'])} | | | | |"
    return head + (f" {row['step0_difference_max']:.1e} | {_ms(row['loss_final'])} | "
                   f"{_paired_text(row['minus_parent'])} | {_paired_text(row['minus_restarted'])} | "
                   f"{_paired_text(row['minus_equal_compute'])} | {_ms(row['busiest_share'], digits=2)} |")


def markdown(results: dict[str, Any]) -> str:
    """The results table in Markdown, with the run's settings and data above it."""
    cfg = results["config"]
    lines = [
        f"{corpus_text(results)} Parent: {cfg['layers']} pre-norm blocks, width {cfg['width']}, "
        f"FFN {4 * cfg['width']}, {cfg['heads']} heads, context {cfg['context']}. Budget {cfg['steps']} steps of "
        f"{cfg['batch']} windows; Adam (0.9, 0.95), lr {cfg['lr']}, warmup {cfg['warmup']:.0%}, cosine to "
        f"{cfg['floor']:.0%}. At step {results['growth_step']} every block's FFN is upcycled by `onnxmorph.moe` "
        "(the arm's routing: topk-softmax from a random router, softmax-topk from a zero one) and trained to the "
        f"end with a fresh Adam re-warmed over {cfg['rewarm']} steps. {len(cfg['seeds'])} seed(s); mean ± sample "
        "std; validation loss in nats per byte "
        f"over {cfg['validation_windows']} windows, evaluated every {cfg['eval_every']} steps. Differences are "
        "the MoE minus a dense baseline, paired by seed (seeds where the MoE was ahead in brackets): the parent "
        "trained on (same steps, its Adam state kept), the parent restarted like the MoE (fresh Adam, same "
        "re-warm, same steps), and the restarted parent at equal active compute (as many more steps as the MoE's "
        "active FLOPs buy). GFLOPs per training step: active = what top-k routing needs (the chosen experts and "
        "the routers), dense = what onnxmorph's graph computes (every expert; torch's FlopCounterMode on the "
        "trained module); ms/step measured in the same run (one thread, forward + backward + Adam). Busiest "
        "expert: the largest share of routed slots any expert of a router received on validation windows at "
        "the end (1/E is balanced).",
        "",
        "| model | params | active GFLOPs/step | dense GFLOPs/step | ms/step | step-0 loss − parent's | final loss "
        "| − parent, trained on | − parent, restarted | − parent, equal compute | busiest expert |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row_text(row) for row in results["rows"]]
    lines.append("")
    lines.append(f"Run time: {results['seconds']:.0f} s with {results['workers']} worker(s) on {cfg['device']}; "
                 f"{results.get('cpu_seconds', 0):.0f} s of CPU time in all.")
    return "\n".join(lines) + "\n"


def _band(ax: Any, xs: list[np.ndarray], ys: list[Sequence[float]], color: str, label: str, style: str = "-") -> None:
    x = xs[0]
    losses = np.asarray([np.interp(x, xi, yi) for xi, yi in zip(xs, ys)])
    ax.plot(x, losses.mean(0), style, color=color, label=label, lw=1.3)
    ax.fill_between(x, losses.min(0), losses.max(0), color=color, alpha=0.18, lw=0)


def plot(results: dict[str, Any], path: Path) -> None:
    """Validation loss after the growth point against steps (left) and against active training FLOPs (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = results["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if not seeds:
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    at = results["growth_step"]
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
    for ax, by_flops in ((axes[0], False), (axes[1], True)):
        parent = [s["parent"] for s in seeds]
        keep = [np.asarray(p["curve"]["step"]) >= at for p in parent]
        xs = [np.asarray(p["curve"]["flops"] if by_flops else p["curve"]["step"], float)[m] for p, m in
              zip(parent, keep)]
        if by_flops:
            xs = [x - x[0] for x in xs]
        _band(ax, [x / (1e12 if by_flops else 1) for x in xs],
              [np.asarray(p["curve"]["loss"])[m] for p, m in zip(parent, keep)], "0.45", "dense, trained on", "--")
        for k, run in enumerate(seeds[0]["dense"]):
            curves = [s["dense"][k]["curve"] for s in seeds]
            xs = [np.asarray(c["flops"], float) / 1e12 if by_flops else np.asarray(c["step"], float) for c in curves]
            label = "dense, restarted" if run["ratio"] == 1.0 else f"dense, restarted, {run['ratio']:.2f}x steps"
            _band(ax, xs, [c["loss"] for c in curves], "0.2" if run["ratio"] == 1.0 else "0.7", label, ":")
        for k, arm in enumerate(seeds[0]["arms"]):
            curves = [s["arms"][k]["curve"] for s in seeds]
            xs = [np.asarray(c["flops"], float) / 1e12 if by_flops else np.asarray(c["step"], float) for c in curves]
            _band(ax, xs, [c["loss"] for c in curves], colors[k % len(colors)], arm["arm"])
        ax.set_xlabel("active training TFLOPs since the growth point" if by_flops else "steps", fontsize=8)
        ax.set_ylabel("validation loss (nats/byte)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("byte-level GPT: FFNs upcycled to experts by onnxmorph vs the dense parent "
                 "(lines: mean, bands: min-max over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
