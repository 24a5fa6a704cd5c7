"""Does upcycling pay? The text-growth GPT's FFNs turned into experts by onnxmorph, against the dense parent trained on.

    python -m onnxmorph.experiments.moegrowth                 # full run: docs/moegrowth.{json,md,png}
    python -m onnxmorph.experiments.moegrowth --quick         # a small smoke run (CI, < 60 s)

Data and parent as in onnxmorph.experiments.textgrowth (a byte-level GPT-2-style decoder on Python's
standard library, 2 blocks, width 64, FFN 256). The parent trains for the whole budget; at the
growth point its snapshot is exported to ONNX and every block's FFN is upcycled by `onnxmorph.moe`
(verified equal by onnxruntime), loaded with onnxmorph.train.to_torch and trained for the rest of
the budget with a fresh Adam (re-warmed). Arms:

* moe4: 4 experts, top-2 (each a copy of the FFN; topk-softmax routing, as Mixtral: a softmax over
  the two chosen logits; random router);
* moe8: 8 experts, top-2;
* fine8: 8 fine-grained experts, 2 shards of the FFN's hidden units with 4 copies of each, top-2
  per shard: four half-size experts per token, the active FLOPs of moe4 and moe8.

Baselines, all from the same snapshot: the parent trained on (its own run: same steps, Adam state
kept), the parent restarted like the children (fresh Adam, same re-warm, same steps), and the
parent restarted and trained for as many more steps as the top-2 arms' active FLOPs buy (equal
compute). FLOPs are counted two ways: active (what top-k routing needs per token: the chosen
experts' matmuls and the router's) and dense (what onnxmorph's graph computes: every expert), with
the seconds per step measured in the same run.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

import onnxmorph
from onnxmorph.experiments import budget_main, lm, log_to_stderr, run_jobs
from onnxmorph.experiments.textgrowth import load_data, schedule, validation_loss
from onnxmorph.numerics import experts as nexperts
from onnxmorph.train import adapter as ot

log = logging.getLogger("onnxmorph.experiments.moegrowth")

# arm -> the moe morph's parameters (applied to every block's FFN)
ARMS: dict[str, dict[str, Any]] = {
    "moe4": {"experts": 4, "top_k": 2},
    "moe8": {"experts": 8, "top_k": 2},
    "fine8": {"experts": 8, "top_k": 2, "shards": 2},
}


@dataclass(frozen=True)
class Config:
    """Budgets, shapes and optimiser settings of one run."""

    steps: int = 1000  # the whole budget in steps: the parent's, and the parent's snapshot + a child's
    growth: float = 0.5  # the growth point, as a share of the budget
    batch: int = 8
    context: int = 64
    layers: int = 2
    width: int = 64
    heads: int = 4
    lr: float = 2e-3
    warmup: float = 0.05
    floor: float = 0.1
    rewarm: int = 50  # steps of warmup after growth (a fresh Adam)
    eval_every: int = 25
    validation_windows: int = 64
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    device: str = "cpu"


FULL = Config()
QUICK = Config(steps=24, batch=4, context=32, rewarm=2, eval_every=6, validation_windows=8, seeds=(0,))


def growth_step(config: Config) -> int:
    """The growth point in steps, on the evaluation grid."""
    return max(1, round(config.growth * config.steps / config.eval_every)) * config.eval_every


def parent_config(config: Config) -> lm.GPTConfig:
    return lm.GPTConfig(config.layers, config.width, config.heads, config.context)


def upcycle(model: onnx.ModelProto, arm: str, config: Config, seed: int) -> onnx.ModelProto:
    """Every block's FFN of the exported parent turned into the arm's experts (each step verified by onnxmorph)."""
    for block in range(config.layers):
        model = onnxmorph.moe(model, layer=str(block), seed=seed + block, **ARMS[arm])
    return model


# --------------------------------------------------------------------------- FLOPs


def ffn_step_flops(config: Config) -> int:
    """FLOPs of the parent's FFNs in one training step: two matmuls per block, 6 FLOPs per multiply-add pair."""
    tokens = config.batch * config.context
    hidden = parent_config(config).mlp_width
    return 6 * tokens * 2 * config.width * hidden * config.layers


def active_step_flops(arm: str, config: Config, parent_flops: int) -> int:
    """What top-k routing needs per step: the parent's FLOPs with each FFN counted `active` times, plus the routers."""
    layout = nexperts.plan_layout(hidden=parent_config(config).mlp_width, **ARMS[arm])
    active, _ = nexperts.ffn_multiples(layout)
    router = 6 * config.batch * config.context * config.width * layout.experts * config.layers
    return int(parent_flops + (active - 1) * ffn_step_flops(config) + router)


def equal_compute_ratios(ratios: Sequence[float]) -> list[float]:
    """The dense baselines' lengths (multiples of the rest of the budget): 1, and one run as long as the longest
    arm's active compute buys (rounded up), within which every arm's equal-compute point lies."""
    longer = [r for r in ratios if r > 1.02]
    return [1.0] + ([math.ceil(max(longer) * 100) / 100] if longer else [])


def seconds_per_step(module: torch.nn.Module, data: dict[str, Any], config: Config, steps: int = 5) -> float:
    """Wall seconds of a training step (forward, backward, Adam), median of `steps` after one warm-up."""
    optimiser = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.0)
    x, y = data["x"][:config.batch].to(config.device), data["y"][:config.batch].to(config.device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimiser.zero_grad()
        lm.lm_loss(module(x), y).backward()
        optimiser.step()
        times.append(time.perf_counter() - start)
    module.zero_grad(set_to_none=True)
    return float(np.median(times[1:]))


# --------------------------------------------------------------------------- training


def train(module: torch.nn.Module, data: dict[str, Any], config: Config, start: int, steps: int, seed: int,
          flops_per_step: int, restart: bool, snapshots: Sequence[int] = ()) -> tuple[dict[str, list], dict]:
    """Train from global step `start` for `steps` steps, following the parent's schedule from `start` to its end.

    A run longer or shorter than the rest of the budget follows the same schedule stretched to its
    length. `restart` re-warms the learning rate over `rewarm` steps (a fresh Adam). Returns the
    validation curve (steps counted from the start of the parent's run; `flops`: the compute spent
    since `start`) and the state at each step of `snapshots`.
    """
    overall = schedule(config)
    rest = config.steps - start
    rewarm = config.rewarm if restart else 0

    def factor(step: int) -> float:
        mapped = start + max(1, round(step * rest / steps)) if start else step
        return overall(mapped) * (min(1.0, step / rewarm) if rewarm else 1.0)

    curve: dict[str, list] = {"step": [start], "flops": [0], "loss": [validation_loss(module, data)]}
    saved: dict[int, dict[str, torch.Tensor]] = {}

    def record(step: int, loss: float) -> None:
        now = start + step
        if step % config.eval_every == 0 or step == steps:
            curve["step"].append(now)
            curve["flops"].append(step * flops_per_step)
            curve["loss"].append(validation_loss(module, data))
        if now in snapshots:
            saved[now] = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    ot.fit(module, data["x"], data["y"], loss=lm.lm_loss, steps=steps, batch_size=config.batch,
           optimizer=lambda p: torch.optim.Adam(p, lr=config.lr, betas=(0.9, 0.95)), seed=seed, callback=record,
           lr_schedule=factor)
    return curve, saved


def _parameters(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


def expert_load(model: onnx.ModelProto, windows: np.ndarray) -> list[list[float]]:
    """For each router's TopK, the share of the chosen slots each expert received on `windows` (onnxruntime)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    picks = [(n.output[1], n.input[0]) for n in probe.graph.node if n.op_type == "TopK"]
    for name, _ in picks:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run([name for name, _ in picks], {"tokens": windows.astype(np.int64)})
    loads = []
    for (name, _), chosen in zip(picks, outputs):
        count = _experts_of(probe, name)
        hist = np.bincount(chosen.reshape(-1), minlength=count).astype(float)
        loads.append((hist / hist.sum()).round(4).tolist())
    return loads


def _experts_of(model: onnx.ModelProto, topk_output: str) -> int:
    """The number of experts a TopK chooses from: the width of the router weight behind it."""
    node = next(n for n in model.graph.node if n.op_type == "TopK" and n.output[1] == topk_output)
    producers = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name: t for t in model.graph.initializer}
    source = node.input[0]
    while source in producers:
        p = producers[source]
        if p.op_type == "MatMul" and p.input[1] in weights:
            return int(weights[p.input[1]].dims[-1])
        source = p.input[0]
    raise ValueError(f"no router behind {topk_output}")


def run_seed(seed: int, config: Config, arms: Sequence[str]) -> dict[str, Any]:
    """One seed: the parent over the whole budget, the dense baselines and every arm from its snapshot."""
    torch.set_num_threads(config.threads)
    start_cpu = time.process_time()
    data = load_data(config)
    at = growth_step(config)
    rest = config.steps - at
    parent = lm.GPT(parent_config(config), seed).to(config.device)
    parent_flops = lm.step_flops(parent, config.batch, config.context)
    log.info("seed %d: the parent (%d parameters), %d steps, grown at step %d", seed, _parameters(parent),
             config.steps, at)
    curve, snapshots = train(parent, data, config, 0, config.steps, seed, parent_flops, False, snapshots=[at])
    parent_loss = curve["loss"][curve["step"].index(at)]
    snapshot = lm.GPT(parent_config(config), seed)
    snapshot.load_state_dict(snapshots[at])
    exported = lm.export(snapshot)
    result: dict[str, Any] = {"seed": seed, "at": at, "parent": {
        "curve": curve, "flops_per_step": parent_flops, "parameters": _parameters(parent),
        "seconds_per_step": seconds_per_step(ot.to_torch(exported).to(config.device), data, config)}}
    # dense baselines from the snapshot, restarted like the children
    active = {arm: active_step_flops(arm, config, parent_flops) for arm in arms}
    ratios = equal_compute_ratios([active[arm] / parent_flops for arm in arms])
    result["dense"] = []
    for ratio in ratios:
        steps = max(1, round(rest * ratio))
        net = ot.to_torch(exported).to(config.device)
        dense_curve, _ = train(net, data, config, at, steps, seed + 1000, parent_flops, True)
        result["dense"].append({"ratio": ratio, "steps": steps, "curve": dense_curve})
        log.info("seed %d: dense restarted for %d steps (%.2fx the rest): %.4f", seed, steps, ratio,
                 dense_curve["loss"][-1])
    result["arms"] = []
    for arm in arms:
        child = upcycle(exported, arm, config, seed)
        net = ot.to_torch(child).to(config.device)
        reference = ot.to_torch(exported).to(config.device)
        with torch.no_grad():
            probe = data["vx"][:8].to(config.device)
            gap = float((net(probe) - reference(probe)).abs().max())
        routers = {k: v.detach().clone() for k, v in net.onnx_parameters().items() if "/router" in k}
        dense_flops = lm.step_flops(net, config.batch, config.context)
        seconds = seconds_per_step(net, data, config)
        arm_curve, _ = train(net, data, config, at, rest, seed + 2000, active[arm], True)
        moved = max(float((net.onnx_parameters()[k].detach() - v).abs().max()) for k, v in routers.items())
        trained = ot.to_onnx(net)
        load = expert_load(trained, data["vx"].numpy()[:32])
        log.info("seed %d, %s: step-0 loss %.6f (parent %.6f, largest logit difference %.1e), final %.4f; router "
                 "moved by up to %.3f; busiest expert's share %.2f", seed, arm, arm_curve["loss"][0], parent_loss,
                 gap, arm_curve["loss"][-1], moved, max(max(x) for x in load))
        result["arms"].append({
            "arm": arm, "params": ARMS[arm], "curve": arm_curve, "max_logit_gap": gap, "parent_loss": parent_loss,
            "parameters": _parameters(net), "active_flops_per_step": active[arm], "dense_flops_per_step": dense_flops,
            "seconds_per_step": seconds, "router_moved": moved, "load": load})
    result["cpu_seconds"] = time.process_time() - start_cpu
    return result


def _worker_init() -> None:
    if not log.handlers:
        log_to_stderr(log)


def run(config: Config, workers: int = 1) -> dict[str, Any]:
    """The whole experiment; returns everything as plain data (curves, FLOPs, rows)."""
    from onnxmorph.experiments.moegrowth_report import summarise

    torch.set_num_threads(config.threads)
    start, cpu = time.perf_counter(), time.process_time()
    jobs = [(seed, config, tuple(config.arms)) for seed in config.seeds]
    seeds = run_jobs(run_seed, jobs, workers, _worker_init)
    out = {"config": asdict(config), "corpus": load_data(config)["meta"], "growth_step": growth_step(config),
           "ffn_flops_per_step": ffn_step_flops(config),
           "versions": {"torch": torch.__version__, "onnxmorph": onnxmorph.__version__,
                        "onnxruntime": ort.__version__, "python": ".".join(map(str, sys.version_info[:3]))},
           "seeds": seeds, "workers": workers}
    out["rows"] = summarise(out)
    out["seconds"] = time.perf_counter() - start
    out["cpu_seconds"] = time.process_time() - cpu + (sum(s["cpu_seconds"] for s in seeds) if workers > 1 else 0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from onnxmorph.experiments.moegrowth_report import markdown, plot

    return budget_main(argv, stem="moegrowth", doc=__doc__, arms=ARMS, arms_default="all", quick=QUICK,
                       full=FULL, run=run, markdown=markdown, plot=plot, log=log)


if __name__ == "__main__":
    raise SystemExit(main())
