"""Does morphing pay? Fine-tuned onnxmorph children against the same architectures trained from scratch, on digits.

    python -m onnxmorph.experiments.digits            # full run: docs/digits.{json,md,png}
    python -m onnxmorph.experiments.digits --quick    # a small smoke run (CI), digits-quick.* in --out

Data: scikit-learn's bundled digits (1797 8x8 images, no download), a fixed stratified split of
1297 training and 500 test images. A small parent CNN (built in ONNX, trained through
onnxmorph.train) is trained for `parent_steps`; onnxmorph makes each child from the trained
parent; the child is fine-tuned for `finetune_steps`, while the same child architecture, freshly
initialised, is trained for `parent_steps + finetune_steps` (the same total budget). The parent
itself, trained on for `finetune_steps`, is the control a morph must beat to be worth it. The
paper's MLP case (64 inputs, tanh, deepened with a P-tanh) is run the same way. Everything is
seeded; accuracies are on the test split, averaged over seeds (sample standard deviation).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxmorph
from onnxmorph.experiments import log_to_stderr, run_jobs, write_results
from onnxmorph.graph.build import P_ACTIVATION_SUFFIX
from onnxmorph.train import adapter as ot

log = logging.getLogger("onnxmorph.experiments.digits")

OPSET = 13
TEST_SIZE = 500
SPLIT_SEED = 0


@dataclass(frozen=True)
class Config:
    """Budgets and optimiser settings of one run."""

    parent_steps: int = 1500
    finetune_steps: int = 500
    eval_every: int = 25
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    batch_size: int = 64
    lr: float = 3e-3
    # Intra-op threads cannot help tensors this small, and on a shared 2-core machine a second
    # thread made each step about 3x slower (measured), so the run uses one.
    threads: int = 1


FULL = Config()
QUICK = Config(parent_steps=60, finetune_steps=20, eval_every=20, seeds=(0, 1))


@dataclass(frozen=True)
class Child:
    """One morph of the parent: a label, the pass and its parameters (the seed is added per run)."""

    label: str
    morph: str
    params: dict[str, Any] = field(default_factory=dict)
    # Fraction of the fine-tuning steps over which the P-activations' `a` is pulled to 0
    # (onnxmorph.train.fit's anneal_activations); 0 leaves `a` to the optimiser.
    anneal: float = 0.0


CNN_CHILDREN = (
    Child("deeper, netmorph", "deepen", {"layer": "conv2", "kernel": 3, "activation": "relu", "method": "netmorph"}),
    Child("deeper, identity", "deepen", {"layer": "conv2", "kernel": 3, "activation": "relu", "method": "identity"}),
    Child("wider, netmorph", "widen", {"layer": "conv2", "width": 16, "method": "netmorph"}),
    # Without noise, Net2Net's copies get identical gradients and never become different units.
    Child("wider, net2net", "widen", {"layer": "conv2", "width": 16, "method": "net2net", "noise": 0.1}),
    Child("subnet, residual", "subnet", {"layer": "conv2", "kind": "residual"}),
    Child("deeper, netmorph, a annealed", "deepen",
          {"layer": "conv2", "kernel": 3, "activation": "relu", "method": "netmorph"}, anneal=0.5),
)
MLP_CHILDREN = (
    Child("deeper, netmorph, P-tanh", "deepen", {"layer": "fc1", "activation": "tanh", "method": "netmorph"}),
    Child("deeper, netmorph, P-tanh, a annealed", "deepen",
          {"layer": "fc1", "activation": "tanh", "method": "netmorph"}, anneal=0.5),
)


# --------------------------------------------------------------------------- data and parents


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], split (stratified, fixed seed) into train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED,
                                                        stratify=y)
    return x_train, x_test, y_train, y_test


def _fan_in(node: onnx.NodeProto, shape: Sequence[int]) -> int:
    if node.op_type == "Conv":
        return int(np.prod(shape[1:]))
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return int(shape[1])
    return int(shape[0])


def initialise(model: onnx.ModelProto, seed: int, gain: float) -> onnx.ModelProto:
    """`model` with fresh weights: normal(0, gain / sqrt(fan_in)) weights, zero biases, `a` = 0.

    Single numbers other than `a` are constants of the graph (onnxmorph.train freezes them too) and
    are kept.

    The parents are built with it, and so are the children "from scratch" (every P-activation
    starts as its plain non-linearity, a = 0, as in an ordinary network of that shape).
    """
    rng = np.random.default_rng(seed)
    fan = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            fan[node.input[1]] = node
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, init in enumerate(out.graph.initializer):
        array = numpy_helper.to_array(init)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        if array.size == 1 and not init.name.endswith(P_ACTIVATION_SUFFIX):
            continue  # a constant of the graph's formulas (the 1 of a P-activation's 1 - a), not a weight
        if init.name.endswith(P_ACTIVATION_SUFFIX):
            new = np.zeros_like(array)
        elif init.name in fan:
            std = gain / np.sqrt(_fan_in(fan[init.name], array.shape))
            new = (rng.standard_normal(array.shape) * std).astype(array.dtype)
        else:
            new = np.zeros_like(array)
        out.graph.initializer[k].CopyFrom(numpy_helper.from_array(new, init.name))
    return out


def _model(nodes: list[onnx.NodeProto], inits: dict[str, tuple[int, ...]], name: str,
           x_shape: list[Any]) -> onnx.ModelProto:
    tensors = [numpy_helper.from_array(np.zeros(shape, np.float32), n) for n, shape in inits.items()]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8,
                             producer_name="onnxmorph.experiments.digits")


def parent_cnn(seed: int, c1: int = 4, c2: int = 8) -> onnx.ModelProto:
    """A deliberately small CNN: conv3x3(c1)-relu-pool, conv3x3(c2)-relu-pool, linear(10)."""
    n = helper.make_node
    nodes = [
        n("Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        n("Relu", ["c1"], ["r1"], name="relu1"),
        n("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
        n("Relu", ["c2"], ["r2"], name="relu2"),
        n("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        n("Flatten", ["p2"], ["flat"], name="flatten"),
        n("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    inits = {"conv1.weight": (c1, 1, 3, 3), "conv1.bias": (c1,), "conv2.weight": (c2, c1, 3, 3),
             "conv2.bias": (c2,), "fc.weight": (10, c2 * 4), "fc.bias": (10,)}
    return initialise(_model(nodes, inits, "digits_cnn", ["N", 1, 8, 8]), seed, gain=np.sqrt(2.0))


def parent_mlp(seed: int, hidden: int = 32) -> onnx.ModelProto:
    """The paper's MLP case: 64 inputs, one tanh hidden layer, 10 outputs."""
    n = helper.make_node
    nodes = [
        n("Gemm", ["image", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
        n("Tanh", ["h"], ["t"], name="tanh1"),
        n("Gemm", ["t", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    inits = {"fc1.weight": (hidden, 64), "fc1.bias": (hidden,), "fc2.weight": (10, hidden), "fc2.bias": (10,)}
    return initialise(_model(nodes, inits, "digits_mlp", ["N", 64]), seed, gain=1.0)


# --------------------------------------------------------------------------- training runs


def _accuracy(net: ot.OnnxModule, x: np.ndarray, y: np.ndarray) -> float:
    return float((ot.predict(net, x).argmax(axis=1) == y).mean())


def _mean_a(net: ot.OnnxModule) -> float | None:
    alphas = ot.activation_parameters(net)
    if not alphas:
        return None
    return float(torch.cat([a.detach().flatten() for a in alphas.values()]).mean())


def run_training(model: onnx.ModelProto, data: tuple[np.ndarray, ...], steps: int, seed: int,
                 config: Config, anneal: int | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Train `model` for `steps`; returns the trained model and its curve (test accuracy, mean a).

    `anneal`: steps over which the P-activations' `a` is pulled to 0 (None: `a` is free).
    """
    x_train, x_test, y_train, y_test = data
    net = ot.to_torch(model)
    curve = {"step": [0], "accuracy": [_accuracy(net, x_test, y_test)], "a": [_mean_a(net)]}

    def record(step: int, loss: float) -> None:
        if step % config.eval_every == 0 or step == steps:
            curve["step"].append(step)
            curve["accuracy"].append(_accuracy(net, x_test, y_test))
            curve["a"].append(_mean_a(net))

    ot.fit(net, x_train, y_train, loss="cross_entropy", optimizer=lambda p: torch.optim.Adam(p, lr=config.lr),
           steps=steps, batch_size=config.batch_size, seed=seed, callback=record, anneal_activations=anneal)
    return ot.to_onnx(net), curve


def _steps_to(curve: dict[str, Any], target: float) -> int | None:
    return next((s for s, acc in zip(curve["step"], curve["accuracy"]) if acc >= target), None)


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ot.predict(ot.to_torch(model), x)


@dataclass(frozen=True)
class Family:
    """A parent architecture, its children and its input layout."""

    name: str
    build: Callable[[int], onnx.ModelProto]
    children: tuple[Child, ...]
    gain: float  # of the scratch initialisation, as for the parent
    image_shape: tuple[int, ...]


FAMILIES = (
    Family("CNN", parent_cnn, CNN_CHILDREN, float(np.sqrt(2.0)), (1, 8, 8)),
    Family("MLP", parent_mlp, MLP_CHILDREN, 1.0, (64,)),
)


def _available(family: Family) -> list[Child]:
    return [c for c in family.children if c.morph in onnxmorph.REGISTRY]


def run_seed(family_name: str, seed: int, config: Config) -> dict[str, dict[str, Any]]:
    """Parent, parent trained on, and each child (morphed and from scratch) of one family for one seed."""
    torch.set_num_threads(config.threads)
    family = next(f for f in FAMILIES if f.name == family_name)
    x_train, x_test, y_train, y_test = load_data()
    data = (x_train.reshape(-1, *family.image_shape), x_test.reshape(-1, *family.image_shape), y_train, y_test)
    total = config.parent_steps + config.finetune_steps
    runs: dict[str, dict[str, Any]] = {}
    log.info("%s, seed %d: training the parent for %d steps", family.name, seed, config.parent_steps)
    start = family.build(seed)
    parent, curve = run_training(start, data, config.parent_steps, seed, config)
    parent_acc = curve["accuracy"][-1]
    runs["parent"] = {"seed": seed, "curve": curve, "offset": 0, "parameters": _count(start),
                      "steps_to_parent_accuracy": _steps_to(curve, parent_acc)}
    _, curve = run_training(parent, data, config.finetune_steps, seed + 1000, config)
    runs["parent, trained on"] = {"seed": seed, "curve": curve, "offset": config.parent_steps}
    parent_logits = _logits(parent, data[1])
    for child in _available(family):
        log.info("%s, seed %d: %s", family.name, seed, child.label)
        morphed = getattr(onnxmorph, child.morph)(parent, seed=seed, **child.params)
        gap = float(np.abs(_logits(morphed, data[1]) - parent_logits).max())
        anneal = max(1, round(child.anneal * config.finetune_steps)) if child.anneal else None
        _, curve = run_training(morphed, data, config.finetune_steps, seed + 1000, config, anneal)
        runs[f"{child.label} (morph)"] = {
            "seed": seed, "curve": curve, "offset": config.parent_steps, "parent_accuracy": parent_acc,
            "max_logit_gap_at_step_0": gap, "parameters": _count(morphed),
            "steps_to_parent_accuracy": _steps_to(curve, parent_acc)}
        scratch = initialise(morphed, seed + 2000, family.gain)
        # From scratch `a` starts at 0; annealing then holds it there (the plain activation throughout).
        _, curve = run_training(scratch, data, total, seed + 2000, config, anneal)
        runs[f"{child.label} (scratch)"] = {
            "seed": seed, "curve": curve, "offset": 0, "parent_accuracy": parent_acc,
            "steps_to_parent_accuracy": _steps_to(curve, parent_acc)}
    return runs


def _worker_init() -> None:
    if not log.handlers:
        log_to_stderr(log)


def run_families(config: Config, workers: int = 1, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every (family, seed) job, in `workers` processes; results are the same for any number of workers."""
    chosen = [f for f in FAMILIES if names is None or f.name in names]
    jobs = [(family.name, seed, config) for family in chosen for seed in config.seeds]
    results = run_jobs(run_seed, jobs, workers, _worker_init)
    by_job = dict(zip([job[:2] for job in jobs], results))
    families = []
    for family in chosen:
        missing = [c.label for c in family.children if c not in _available(family)]
        for label in missing:
            log.warning("%s: onnxmorph has no such morph here; left out", label)
        labels = by_job[(family.name, config.seeds[0])].keys()
        runs = {label: [by_job[(family.name, seed)][label] for seed in config.seeds] for label in labels}
        families.append({"name": family.name, "missing": missing, "runs": runs})
    return families


def _count(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


# --------------------------------------------------------------------------- report


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def summarise(family: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    """One row per entry: accuracy at its step 0 and at the end, steps to the parent's accuracy."""
    rows = []
    runs = family["runs"]
    parent_final = {r["seed"]: r["curve"]["accuracy"][-1] for r in runs["parent"]}
    control = {r["seed"]: r["curve"]["accuracy"][-1] for r in runs["parent, trained on"]}
    for label, entries in runs.items():
        final = [e["curve"]["accuracy"][-1] for e in entries]
        row: dict[str, Any] = {
            "model": label,
            "steps": entries[0]["curve"]["step"][-1],
            "offset": entries[0]["offset"],
            "accuracy_step0": _stats([e["curve"]["accuracy"][0] for e in entries]),
            "accuracy_final": _stats(final),
        }
        if "parameters" in entries[0]:
            row["parameters"] = entries[0]["parameters"]
        if label.endswith("(morph)"):
            row["step0_equals_parent"] = all(e["curve"]["accuracy"][0] == parent_final[e["seed"]] for e in entries)
            row["max_logit_gap_at_step_0"] = max(e["max_logit_gap_at_step_0"] for e in entries)
            scratch = {e["seed"]: e["curve"]["accuracy"][-1] for e in runs[label.replace("(morph)", "(scratch)")]}
            diffs = [e["curve"]["accuracy"][-1] - scratch[e["seed"]] for e in entries]
            row["minus_scratch"] = {**_stats(diffs), "ahead": sum(d > 0 for d in diffs), "seeds": len(diffs)}
            diffs = [e["curve"]["accuracy"][-1] - control[e["seed"]] for e in entries]
            row["minus_parent_trained_on"] = {**_stats(diffs), "ahead": sum(d > 0 for d in diffs), "seeds": len(diffs)}
        if "steps_to_parent_accuracy" in entries[0]:
            reached = [e["steps_to_parent_accuracy"] for e in entries]
            got = [s for s in reached if s is not None]
            row["steps_to_parent_accuracy"] = {"reached": len(got), "seeds": len(reached),
                                               **(_stats(got) if got else {})}
        if entries[0]["curve"]["a"][-1] is not None:
            row["a_final"] = _stats([e["curve"]["a"][-1] for e in entries])
        rows.append(row)
    return rows


def _pct(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _signed(s: dict[str, Any]) -> str:
    return f"{100 * s['mean']:+.1f} ± {100 * s['std']:.1f} ({s['ahead']}/{s['seeds']})"


def markdown(results: dict[str, Any]) -> str:
    """The results table in Markdown."""
    cfg = results["config"]
    lines = [
        f"Digits (scikit-learn, {results['data']['train']} train / {results['data']['test']} test images), "
        f"{len(cfg['seeds'])} seeds; mean ± sample std of test accuracy in %. Parent: {cfg['parent_steps']} steps; "
        f"morphed children: fine-tuned {cfg['finetune_steps']} steps after the parent's "
        f"(total {cfg['parent_steps'] + cfg['finetune_steps']}); from scratch: the child architecture trained "
        f"{cfg['parent_steps'] + cfg['finetune_steps']} steps. Adam, lr {cfg['lr']}, batch {cfg['batch_size']}. "
        "Differences are paired by seed (how many seeds were ahead in brackets). Steps to the parent's accuracy "
        f"count the steps this model was trained (evaluated every {cfg['eval_every']}); a morph starts at it.",
        "",
        "| model | params | steps | acc. at its step 0 | acc. at the end | minus scratch | minus parent trained on "
        "| steps to parent's acc. (seeds that got there) | mean a at the end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for family in results["families"]:
        for row in family["rows"]:
            reach = row.get("steps_to_parent_accuracy")
            if reach is None:
                reach_text = ""
            elif reach["reached"]:
                reach_text = f"{reach['mean']:.0f} ± {reach['std']:.0f} ({reach['reached']}/{reach['seeds']})"
            else:
                reach_text = f"not reached (0/{reach['seeds']})"
            a_text = f"{row['a_final']['mean']:.2f}" if "a_final" in row else ""
            lines.append(
                f"| {family['name']}: {row['model']} | {row.get('parameters', '')} | {row['steps']} "
                f"| {_pct(row['accuracy_step0'])} | {_pct(row['accuracy_final'])} "
                f"| {_signed(row['minus_scratch']) if 'minus_scratch' in row else ''} "
                f"| {_signed(row['minus_parent_trained_on']) if 'minus_parent_trained_on' in row else ''} "
                f"| {reach_text} | {a_text} |")
        if family["missing"]:
            lines.append(f"| {family['name']}: not run (morph missing): {', '.join(family['missing'])} "
                         "| | | | | | | | |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Learning curves: per child, the morph (after the parent's steps) against scratch, with the seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(family, label[: -len(" (morph)")]) for family in results["families"]
              for label in family["runs"] if label.endswith("(morph)")]
    cols = 3
    rows = -(-(len(panels) + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    flat = axes.ravel()

    def band(ax, entries, color, label, style="-"):
        steps = np.asarray(entries[0]["curve"]["step"]) + entries[0]["offset"]
        accs = np.asarray([e["curve"]["accuracy"] for e in entries])
        ax.plot(steps, accs.mean(0), style, color=color, label=label, lw=1.4)
        ax.fill_between(steps, accs.min(0), accs.max(0), color=color, alpha=0.2, lw=0)

    for ax, (family, child) in zip(flat, panels):
        runs = family["runs"]
        band(ax, runs["parent"], "0.5", "parent")
        band(ax, runs["parent, trained on"], "0.5", "parent trained on", "--")
        band(ax, runs[f"{child} (morph)"], "tab:blue", "morph, fine-tuned")
        band(ax, runs[f"{child} (scratch)"], "tab:red", "child from scratch")
        ax.set_title(f"{family['name']}: {child}", fontsize=9)
        ax.set_ylim(0.8, 1.0)
        ax.set_xlabel("training steps", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    flat[0].legend(fontsize=7, loc="lower right")
    ax = flat[len(panels)]
    for family in results["families"]:
        for label, entries in family["runs"].items():
            if label.endswith("(morph)") and entries[0]["curve"]["a"][0] is not None:
                steps = np.asarray(entries[0]["curve"]["step"]) + entries[0]["offset"]
                a = np.asarray([e["curve"]["a"] for e in entries], dtype=float)
                ax.plot(steps, a.mean(0), label=f"{family['name']}: {label[: -len(' (morph)')]}", lw=1.4)
    ax.set_title("mean P-activation parameter a while fine-tuning", fontsize=9)
    ax.set_xlabel("training steps", fontsize=8)
    ax.set_ylabel("a (1 = linear, 0 = plain activation)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax in flat[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle("onnxmorph on digits: morphed children (fine-tuned after the parent) vs the same "
                 "architectures from scratch; lines: mean, bands: min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config: Config, workers: int = 1, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole experiment (or the families in `names`); returns the results (curves, rows) as plain data."""
    torch.set_num_threads(config.threads)
    data = load_data()
    families = run_families(config, workers, names)
    for family in families:
        family["rows"] = summarise(family, config)
    return {"config": asdict(config), "data": {"train": len(data[0]), "test": len(data[1])},
            "versions": {"torch": torch.__version__, "onnxmorph": onnxmorph.__version__},
            "families": families}


def _keep_other_families(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """`results` (some families) completed with the other families of the run saved at `path`, same settings only."""
    if not path.is_file():
        return results
    previous = json.loads(path.read_text())
    if previous["config"] != json.loads(json.dumps(results["config"])):
        raise SystemExit(f"{path} was made with other settings; rerun every family")
    fresh = {f["name"]: f for f in results["families"]}
    families = [fresh.pop(f["name"], f) for f in previous["families"]] + list(fresh.values())
    rerun = sorted(set(previous.get("rerun", [])) | {f["name"] for f in results["families"]})
    return {**results, "families": families, "rerun": rerun}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxmorph.experiments.digits", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small budgets and 2 seeds (a smoke test, < 60 s)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the results (default: docs)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 5, quick: 2)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes running seeds in parallel (default: 2, quick: 1)")
    parser.add_argument("--threads", type=int, default=FULL.threads, help="torch threads (default: 1)")
    parser.add_argument("--family", choices=[f.name for f in FAMILIES], default=None,
                        help="run this family only; the others are kept from the results already in --out")
    args = parser.parse_args(argv)
    # Progress of this run only; the morphs' own INFO logs would drown it.
    if not log.handlers:
        log_to_stderr(log)
    config = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {"threads": args.threads}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    config = Config(**{**asdict(config), **overrides})
    start = time.perf_counter()
    workers = args.workers if args.workers is not None else (1 if args.quick else 2)
    results = run(config, workers, None if args.family is None else [args.family])
    stem = "digits-quick" if args.quick else "digits"
    if args.family is not None:
        results = _keep_other_families(args.out / f"{stem}.json", results)
    write_results(args.out, stem, results, markdown, plot, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
