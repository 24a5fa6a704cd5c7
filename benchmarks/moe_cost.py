"""Benchmark: what an upcycled model costs to run, dense evaluation against top-k, FLOPs and onnxruntime time.

    python benchmarks/moe_cost.py            # a 4-block GPT of width 256 (FFN 1024), about a minute
    python benchmarks/moe_cost.py --quick    # a smoke run, seconds

The byte-level GPT of onnxmorph.experiments.lm (seeded random weights) is exported, and every
block's FFN is upcycled by `onnxmorph.moe` (verified). For the parent and each child it reports
the FLOPs per token counted by torch's FlopCounterMode on the model's forward (every expert: what
onnxmorph's dense graph computes), the FLOPs top-k routing needs (the chosen experts' and the
routers'), and onnxruntime's CPU time for a batch (one thread, default graph optimisations, median
of the runs after a warm-up), each as a ratio to the parent's measured in the same run. Results go
to benchmarks/moe_cost_results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "moe_cost_results.json"

# child -> the moe morph's parameters, applied to every block's FFN
CHILDREN: dict[str, dict[str, Any]] = {
    "4 experts, top-2": {"experts": 4, "top_k": 2},
    "8 experts, top-2": {"experts": 8, "top_k": 2},
    "8 experts from 2 shards, top-1 per shard": {"experts": 8, "top_k": 1, "shards": 2, "routing": "softmax-topk"},
    "4 shards, all active": {"experts": 4, "top_k": 4, "shards": 4},
}


def _forward_flops(model: Any, tokens: Any) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from onnxmorph.train import adapter as ot

    module = ot.to_torch(model)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(torch.from_numpy(tokens))
    return int(counter.get_total_flops())


def _seconds(model: Any, tokens: Any, runs: int) -> float:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"tokens": tokens})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"tokens": tokens})
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and few runs (a smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT.name})")
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    import onnxmorph
    from onnxmorph.experiments import lm
    from onnxmorph.numerics import experts as nexperts

    torch.set_num_threads(1)
    layers, width, heads, context, batch, runs = (1, 32, 2, 16, 2, 3) if args.quick else (4, 256, 8, 128, 8, 20)
    config = lm.GPTConfig(layers, width, heads, context)
    parent = lm.export(lm.GPT(config, 0))
    tokens = np.random.default_rng(0).integers(0, lm.VOCAB, (batch, context)).astype(np.int64)
    one = tokens[:1]
    ffn = 2 * 2 * width * config.mlp_width * layers  # forward FLOPs per token of the FFNs: two matmuls a block
    base_flops = _forward_flops(parent, one) / context
    base_seconds = _seconds(parent, tokens, runs)
    rows: list[dict[str, Any]] = [{"model": "parent (dense FFN)", "flops_per_token_dense": base_flops,
                                   "flops_per_token_active": base_flops, "seconds": base_seconds}]
    for name, params in CHILDREN.items():
        child = parent
        for block in range(layers):
            child = onnxmorph.moe(child, layer=str(block), **params)
        layout = nexperts.plan_layout(hidden=config.mlp_width, **params)
        active, _ = nexperts.ffn_multiples(layout)
        router = 2 * width * layout.experts * layers
        rows.append({"model": name, "params": params,
                     "flops_per_token_dense": _forward_flops(child, one) / context,
                     "flops_per_token_active": base_flops + (active - 1) * ffn + router,
                     "seconds": _seconds(child, tokens, runs)})
    for row in rows:
        row["dense_flops_ratio"] = row["flops_per_token_dense"] / base_flops
        row["active_flops_ratio"] = row["flops_per_token_active"] / base_flops
        row["time_ratio"] = row["seconds"] / base_seconds
    result = {"model": {"layers": layers, "width": width, "ffn": config.mlp_width, "heads": heads, "context": context,
                        "batch": batch, "runs": runs},
              "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                          "processor": platform.processor() or platform.machine(), "threads": 1},
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"GPT {layers} blocks, width {width}, FFN {config.mlp_width}, batch {batch} x {context} tokens, "
          "onnxruntime CPU, one thread")
    print(f"{'model':44} {'MFLOPs/token dense':>19} {'active':>8} {'ms/batch':>9} {'dense x':>8} {'active x':>9} "
          f"{'time x':>7}")
    for row in rows:
        dense, active = row["flops_per_token_dense"] / 1e6, row["flops_per_token_active"] / 1e6
        print(f"{row['model']:44} {dense:19.2f} {active:8.2f} {row['seconds'] * 1e3:9.1f} "
              f"{row['dense_flops_ratio']:8.2f} {row['active_flops_ratio']:9.2f} {row['time_ratio']:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
