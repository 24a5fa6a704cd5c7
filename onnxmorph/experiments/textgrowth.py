"""Does growing pay? A byte-level GPT grown by onnxmorph against the same architecture trained from scratch.

    python -m onnxmorph.experiments.textgrowth                 # full run: docs/textgrowth.{json,md,png}
    python -m onnxmorph.experiments.textgrowth --quick         # a small smoke run (CI)
    python -m onnxmorph.experiments.textgrowth --device cuda   # on a GPU, when torch sees one

Data: Python's own standard library sources as bytes (onnxmorph.experiments.lm; no download),
split by file. A GPT-2-style parent (pre-norm, 2 blocks, width 64) is trained in PyTorch for the
whole budget of `steps`; at each growth point its snapshot is exported to ONNX, grown by onnxmorph
(+N identity blocks; hidden width x2; both, as this onnxmorph offers them), loaded with
onnxmorph.train.to_torch and trained for the rest of the budget. Its loss at its step 0 equals the
parent's. Scratch is the child's architecture from random initialisation trained for the whole
budget. Every run follows one learning-rate schedule over global steps (linear warmup, cosine decay
to a floor); a grown model continues it from its growth point with a short re-warmup, since its
Adam state starts empty. The figure the literature reports is the compute (steps and FLOPs, the
parent's and the child's together) the grown model needed to reach scratch's final validation loss,
as a share saved; final losses at equal steps and at equal compute come beside it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import onnx
import torch

import onnxmorph
from onnxmorph.errors import NotApplicable, OnnxMorphError
from onnxmorph.experiments import budget_main, lm, log_to_stderr, run_jobs
from onnxmorph.experiments.textgrowth_report import markdown, plot, summarise
from onnxmorph.train import adapter as ot

log = logging.getLogger("onnxmorph.experiments.textgrowth")

ARMS = ("blocks", "width", "both")
_COST = ("both", "width", "blocks")  # most expensive first


@dataclass(frozen=True)
class Config:
    """Budgets, shapes and optimiser settings of one run."""

    steps: int = 1000  # the whole budget: parent + child steps, and scratch's steps
    growth: tuple[float, ...] = (0.25, 0.5)  # growth points, as shares of the budget
    batch: int = 8
    context: int = 64
    layers: int = 2
    width: int = 64
    heads: int = 4
    lr: float = 2e-3
    warmup: float = 0.05  # share of the budget
    floor: float = 0.1  # the cosine decays to this share of lr
    rewarm: int = 50  # steps of warmup after growth (a fresh Adam)
    eval_every: int = 25
    validation_windows: int = 64
    new_blocks: int = 2
    width_factor: int = 2
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    # Intra-op threads buy little at this size and slow everyone down on a shared 2-core machine.
    threads: int = 1
    device: str = "cpu"


# Both at once costs 3.6x the parent per step, more than the others together: `--arms blocks,width,both`.
FULL = Config(arms=("blocks", "width"))
QUICK = Config(steps=24, growth=(0.5,), batch=4, context=32, rewarm=2, eval_every=6, validation_windows=8,
               new_blocks=1, seeds=(0,))


def growth_steps(config: Config) -> list[int]:
    """The growth points in steps, on the evaluation grid (so the parent's loss there is measured)."""
    points = {max(1, round(share * config.steps / config.eval_every)) * config.eval_every for share in config.growth}
    return sorted(p for p in points if p < config.steps)


def parent_config(config: Config) -> lm.GPTConfig:
    return lm.GPTConfig(config.layers, config.width, config.heads, config.context)


def child_config(arm: str, config: Config) -> lm.GPTConfig:
    """The architecture an arm grows the parent into (and scratch trains)."""
    parent = parent_config(config)
    layers = config.layers + (config.new_blocks if arm in ("blocks", "both") else 0)
    width = config.width * (config.width_factor if arm in ("width", "both") else 1)
    return lm.GPTConfig(layers, width, config.heads, config.context, parent.attention_width, parent.mlp_width)


# --------------------------------------------------------------------------- growth


def add_blocks(model: onnx.ModelProto, config: Config, seed: int) -> onnx.ModelProto:
    """`new_blocks` identity blocks spread over the parent's blocks (one after each, from the first; LLaMA Pro)."""
    if "block" not in onnxmorph.REGISTRY:
        raise NotApplicable("this onnxmorph has no block morph")
    per_block = [config.new_blocks // config.layers + (k < config.new_blocks % config.layers)
                 for k in range(config.layers)]
    position = -1
    for count in per_block:
        position += 1  # where the parent's next block is now
        for _ in range(count):
            model = onnxmorph.block(model, after=position, seed=seed)
            position += 1
    return model


def widen(model: onnx.ModelProto, config: Config, seed: int) -> onnx.ModelProto:
    """The hidden width times `width_factor`, by tiling the residual stream (with cancelling noise).

    `widen` on a layer that writes the residual stream (block 0's attention output projection)
    grows the whole stream with everything that reads and writes it.
    """
    writer = next((n.name for n in model.graph.node if n.op_type == "MatMul" and "proj" in n.name), None)
    if writer is None:
        raise NotApplicable("no attention output projection found to widen the stream from")
    return onnxmorph.widen(model, layer=writer, width=config.width * config.width_factor, seed=seed,
                           **WIDTH_OPTIONS)


# Tiling: net2net at an integer factor copies every channel of the stream (k copies have the copy's
# mean and variance, so the LayerNorms stay exact) and splits each reader's weights among the copies;
# the noise, relative to the weights' scale, makes the copies' readers differ (so they learn different
# things) and cancels exactly.
WIDTH_OPTIONS: dict[str, Any] = {"method": "net2net", "noise": 0.1}


def grow(arm: str, model: onnx.ModelProto, config: Config, seed: int) -> onnx.ModelProto:
    """The parent `model` grown by `arm` (width first, then blocks, for both); each morph verified by onnxmorph."""
    if arm in ("width", "both"):
        model = widen(model, config, seed)
    if arm in ("blocks", "both"):
        model = add_blocks(model, config, seed)
    return model


def available_arms(config: Config) -> dict[str, str | None]:
    """For each arm: None when this onnxmorph can grow the parent that way, else the one-line reason."""
    parent = lm.export(lm.GPT(parent_config(config), 0))
    reasons: dict[str, str | None] = {}
    for arm in config.arms:
        try:
            grow(arm, parent, config, 0)
            reasons[arm] = None
        except OnnxMorphError as error:
            reasons[arm] = str(error).splitlines()[0]
    return reasons


# --------------------------------------------------------------------------- training


def schedule(config: Config) -> Callable[[int], float]:
    """The learning-rate factor at global step t (from 1): linear warmup, then cosine to `floor`."""
    warm = max(1, round(config.warmup * config.steps))

    def factor(step: int) -> float:
        if step <= warm:
            return step / warm
        progress = min(1.0, (step - warm) / max(1, config.steps - warm))
        return config.floor + (1 - config.floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def load_data(config: Config) -> dict[str, Any]:
    """Training windows (all of them), validation windows (evenly spaced) and the corpus record."""
    text = lm.corpus()
    x, y = lm.windows(text["train"], config.context)
    vx, vy = lm.windows(text["validation"], config.context, config.validation_windows)
    return {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "vx": torch.from_numpy(vx),
            "vy": torch.from_numpy(vy), "meta": text["meta"]}


def validation_loss(module: torch.nn.Module, data: dict[str, Any]) -> float:
    """Mean next-byte loss (nats) over the validation windows."""
    device = next(module.parameters()).device
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(data["vx"]), 32):
            x, y = data["vx"][start:start + 32].to(device), data["vy"][start:start + 32].to(device)
            total += float(lm.lm_loss(module(x), y)) * len(x)
    return total / len(data["vx"])


def train(module: torch.nn.Module, data: dict[str, Any], config: Config, start: int, seed: int,
          snapshots: Sequence[int] = ()) -> tuple[dict[str, list[float]], dict[int, dict[str, torch.Tensor]]]:
    """Train `module` from global step `start` to the end of the budget.

    Returns the validation curve (global steps) and the state at each step of `snapshots`.
    """
    overall = schedule(config)
    rewarm = config.rewarm if start else 0

    def factor(step: int) -> float:
        return overall(start + step) * (min(1.0, step / rewarm) if rewarm else 1.0)

    curve = {"step": [start], "loss": [validation_loss(module, data)]}
    saved: dict[int, dict[str, torch.Tensor]] = {}

    def record(step: int, loss: float) -> None:
        now = start + step
        if now % config.eval_every == 0 or now == config.steps:
            curve["step"].append(now)
            curve["loss"].append(validation_loss(module, data))
        if now in snapshots:
            saved[now] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    ot.fit(module, data["x"], data["y"], loss=lm.lm_loss, steps=config.steps - start, batch_size=config.batch,
           optimizer=lambda p: torch.optim.Adam(p, lr=config.lr, betas=(0.9, 0.95)), seed=seed, callback=record,
           lr_schedule=factor)
    return curve, saved


def _parameters(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


def _grow_and_train(arm: str, parent: onnx.ModelProto, step: int, parent_loss: float, data: dict[str, Any],
                    config: Config, seed: int) -> dict[str, Any]:
    child = grow(arm, parent, config, seed)
    net = ot.to_torch(child).to(config.device)
    reference = ot.to_torch(parent).to(config.device)
    with torch.no_grad():
        probe = data["vx"][:8].to(config.device)
        gap = float((net(probe) - reference(probe)).abs().max())
    onnx_parent_loss = validation_loss(reference, data)
    flops = lm.step_flops(net, config.batch, config.context)
    curve, _ = train(net, data, config, step, seed + 1000 + step)
    log.info("seed %d, %s at step %d: validation loss parent %.6f (torch) %.6f (ONNX), child at its step 0 %.6f "
             "(largest logit difference %.1e); child at the end %.4f", seed, arm, step, parent_loss,
             onnx_parent_loss, curve["loss"][0], gap, curve["loss"][-1])
    return {"arm": arm, "at": step, "curve": curve, "parent_loss": parent_loss, "onnx_parent_loss": onnx_parent_loss,
            "max_logit_gap": gap, "flops_per_step": flops, "parameters": _parameters(net)}


def run_grown(seed: int, config: Config, arms: Sequence[str]) -> dict[str, Any]:
    """One seed: the parent over the whole budget, and each arm grown from its snapshot at each growth point."""
    torch.set_num_threads(config.threads)
    data = load_data(config)
    points = growth_steps(config)
    parent = lm.GPT(parent_config(config), seed).to(config.device)
    flops = lm.step_flops(parent, config.batch, config.context)
    log.info("seed %d: training the parent (%d parameters) for %d steps", seed, _parameters(parent), config.steps)
    curve, snapshots = train(parent, data, config, 0, seed, snapshots=points)
    children = []
    for step in points:
        snapshot = lm.GPT(parent_config(config), seed)
        snapshot.load_state_dict(snapshots[step])
        exported = lm.export(snapshot)
        loss = curve["loss"][curve["step"].index(step)]
        children += [_grow_and_train(arm, exported, step, loss, data, config, seed) for arm in arms]
    return {"seed": seed, "parent": {"curve": curve, "flops_per_step": flops, "parameters": _parameters(parent)},
            "children": children}


def run_scratch(seed: int, config: Config, arm: str) -> dict[str, Any]:
    """One seed: the arm's child architecture from random initialisation, trained for the whole budget."""
    torch.set_num_threads(config.threads)
    data = load_data(config)
    model = lm.GPT(child_config(arm, config), seed + 2000).to(config.device)
    flops = lm.step_flops(model, config.batch, config.context)
    curve, _ = train(model, data, config, 0, seed + 2000)
    log.info("seed %d, %s from scratch: validation loss at the end %.4f", seed, arm, curve["loss"][-1])
    return {"seed": seed, "arm": arm, "curve": curve, "flops_per_step": flops, "parameters": _parameters(model)}


def _job(kind: str, seed: int, config: Config, arm: Any) -> dict[str, Any]:
    # CPU time says what the run costs on idle cores, whatever else shares the machine meanwhile.
    start = time.process_time()
    result = run_grown(seed, config, arm) if kind == "grown" else run_scratch(seed, config, arm)
    return {**result, "cpu_seconds": time.process_time() - start}


def _worker_init() -> None:
    if not log.handlers:
        log_to_stderr(log)


def run(config: Config, workers: int = 1) -> dict[str, Any]:
    """The whole experiment; returns everything as plain data (curves, FLOPs, rows)."""
    torch.set_num_threads(config.threads)
    start, cpu = time.perf_counter(), time.process_time()
    reasons = available_arms(config)
    arms = [arm for arm in config.arms if reasons[arm] is None]
    for arm, reason in reasons.items():
        if reason is not None:
            log.warning("%s: not run: %s", arm, reason)
    # The longest jobs first, so that the workers finish together.
    jobs = [("grown", seed, config, tuple(arms)) for seed in config.seeds]
    jobs += [("scratch", seed, config, arm) for arm in sorted(arms, key=_COST.index) for seed in config.seeds]
    results = run_jobs(_job, jobs, workers, _worker_init)
    grown = [r for job, r in zip(jobs, results) if job[0] == "grown"]
    scratch = [r for job, r in zip(jobs, results) if job[0] == "scratch"]
    out = {"config": asdict(config), "corpus": load_data(config)["meta"], "arms_not_run": {
        a: r for a, r in reasons.items() if r is not None}, "growth_steps": growth_steps(config),
        "versions": {"torch": torch.__version__, "onnxmorph": onnxmorph.__version__,
                                 "python": ".".join(map(str, sys.version_info[:3]))},
        "grown": grown, "scratch": scratch, "workers": workers}
    out["rows"] = summarise(out)
    out["seconds"] = time.perf_counter() - start
    # With one worker the jobs ran in this process, and its CPU time already holds theirs.
    out["cpu_seconds"] = time.process_time() - cpu + (sum(r["cpu_seconds"] for r in results) if workers > 1 else 0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return budget_main(argv, stem="textgrowth", doc=__doc__, arms=ARMS, arms_default="blocks,width; quick: all",
                       quick=QUICK, full=FULL, run=run, markdown=markdown, plot=plot, log=log)


if __name__ == "__main__":
    raise SystemExit(main())
