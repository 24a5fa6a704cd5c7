"""A search's results: the ranking, the leaderboard (CSV, JSON, text) and the plot of score against parameters."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxmorph.io import saving

COLUMNS = ("rank", "id", "round", "parent", "change", "parameters", "val_score", "val_loss", "test_score",
           "test_loss", "verify_max_abs_error", "file")


def rank_key(entry: dict[str, Any]) -> tuple[float, int, str]:
    """Best first: higher validation score, then fewer parameters, then the id (a stable tie-break)."""
    return (-entry["val_score"], entry["parameters"], entry["id"])


def ranked(candidates: Sequence[dict[str, Any]], before_round: int | None = None) -> list[dict[str, Any]]:
    """The trained candidates (of rounds before `before_round`, if given), best first."""
    ok = [c for c in candidates if c["status"] == "ok" and (before_round is None or c["round"] < before_round)]
    return sorted(ok, key=rank_key)


def change(entry: dict[str, Any]) -> str:
    """What made a candidate from its parent, in one line."""
    if entry["id"] == "root":
        return "root"
    if not entry["morphs"]:
        return "trained on"
    parts = []
    for step in entry["morphs"]:
        params = {k: v for k, v in sorted(step["params"].items()) if k != "seed" and v not in (None, 0.0, [], ())}
        where = params.pop("layer", None)
        if "source" in params:
            where = f"{params.pop('source')}->{params.pop('target')}"
        args = ", ".join(([where] if where else []) + [f"{k}={_short(v)}" for k, v in params.items()])
        parts.append(f"{step['pass']}({args})")
    return " + ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)


def lineage(entry: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The chain from the root to `entry`: each step's id, change, verification and score."""
    chain = []
    current: dict[str, Any] | None = entry
    while current is not None:
        verification = current.get("verification")
        chain.append({"id": current["id"], "change": change(current), "val_score": current["val_score"],
                      "parameters": current["parameters"], "sha256": current["sha256"],
                      "verified": None if verification is None else bool(verification["passed"])})
        current = by_id.get(current["parent"]) if current["parent"] else None
    return chain[::-1]


def rows(candidates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leaderboard: one row per trained candidate, best first."""
    table = []
    for rank, entry in enumerate(ranked(candidates), 1):
        verification = entry.get("verification")
        table.append({
            "rank": rank, "id": entry["id"], "round": entry["round"], "parent": entry["parent"] or "",
            "change": change(entry), "parameters": entry["parameters"], "val_score": entry["val_score"],
            "val_loss": entry["val_loss"], "test_score": entry.get("test_score"), "test_loss": entry.get("test_loss"),
            "verify_max_abs_error": None if verification is None else verification["max_abs_error"],
            "file": entry["file"],
        })
    return table


def write(outdir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """leaderboard.csv and leaderboard.json in `outdir` (atomically); returns the JSON document."""
    candidates = state["candidates"]
    by_id = {c["id"]: c for c in candidates}
    table = rows(candidates)
    for row in table:
        row["lineage"] = lineage(by_id[row["id"]], by_id)
    failed = [{"id": c["id"], "round": c["round"], "parent": c["parent"], "status": c["status"],
               "reason": c.get("reason", "")} for c in candidates if c["status"] != "ok"]
    document = {"settings": state["settings"], "rounds_done": state["rounds_done"],
                "best": table[0]["id"] if table else None, "leaderboard": table, "failed": failed}
    saving.write_atomically(outdir / "leaderboard.json", (json.dumps(document, indent=1) + "\n").encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    saving.write_atomically(outdir / "leaderboard.csv", text.getvalue().encode())
    return document


def format_table(document: dict[str, Any], limit: int = 10) -> str:
    """The first `limit` rows of the leaderboard as a text table."""
    header = ["rank", "id", "parent", "change", "params", "val", "test"]
    lines = [header]
    for row in document["leaderboard"][:limit]:
        test = "" if row["test_score"] is None else f"{row['test_score']:.4f}"
        lines.append([str(row["rank"]), row["id"], row["parent"], row["change"], str(row["parameters"]),
                      f"{row['val_score']:.4f}", test])
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    more = len(document["leaderboard"]) - limit
    if more > 0:
        text.append(f"... and {more} more (leaderboard.csv)")
    if document["failed"]:
        text.append(f"{len(document['failed'])} candidate(s) not trained (see leaderboard.json 'failed')")
    return "\n".join(text)


def plot(state: dict[str, Any], path: Path) -> None:
    """Validation score against parameters, a line from each candidate to its parent, coloured by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = ranked(state["candidates"])
    by_id = {c["id"]: c for c in done}
    rounds = max(c["round"] for c in done) or 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in done:
        parent = by_id.get(entry["parent"] or "")
        if parent is not None:
            ax.plot([parent["parameters"], entry["parameters"]], [parent["val_score"], entry["val_score"]],
                    color="0.8", lw=0.8, zorder=1)
    points = ax.scatter([c["parameters"] for c in done], [c["val_score"] for c in done],
                        c=[c["round"] for c in done], cmap="viridis", vmin=0, vmax=rounds, s=28, zorder=2)
    root, best = by_id.get("root"), done[0]
    if root is not None:
        ax.scatter([root["parameters"]], [root["val_score"]], marker="*", s=180, color="tab:red", zorder=3,
                   label=f"parent (root): {root['val_score']:.4f}")
    ax.scatter([best["parameters"]], [best["val_score"]], facecolors="none", edgecolors="black", s=140,
               lw=1.5, zorder=3, label=f"best ({best['id']}): {best['val_score']:.4f}")
    if max(c["parameters"] for c in done) > 8 * min(c["parameters"] for c in done):
        ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation score" + (" (accuracy)" if state["settings"]["data"]["task"] == "classification"
                                        else " (minus MSE)"))
    ax.grid(alpha=0.3)
    fig.colorbar(points, ax=ax, label="round", ticks=range(rounds + 1))
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"onnxmorph search on {state['settings']['data']['name']}: {len(done)} models", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    saving.write_atomically(path, buffer.getvalue())
