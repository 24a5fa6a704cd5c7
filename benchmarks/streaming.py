"""Models larger than memory: morphs of big external-data models and of the VGG19-sized inline model.

    python benchmarks/streaming.py                 # all three sections, ~3 GB + ~10 GB of disk at peak
    python benchmarks/streaming.py --only inline   # one section: external | growth | inline
    python benchmarks/streaming.py --quick         # the same machinery on models of a few tens of MB

Sections (every figure beside a floor measured in the same run; peak RSS of each process from wait4):

* external: a VGG-like conv chain with external data (~3 GB): `widen` and `deepen` of its middle
  conv (`--no-verify`) against `onnx.load` + `onnx.save` of the same model; then `verify` of the
  widened child (onnxruntime memory-maps the aligned external data);
* growth: a ~2 GB conv chain with every conv but the last widened 2x by one recipe (a child of
  ~4x the parameters), `--no-verify`, against the same floor of the parent;
* inline: the VGG19-sized model (548 MiB, one file): `widen` and `deepen` of conv4_2 against the floor.

The models are written tensor by tensor (the builder never holds a model) and deleted at the end.
Results go to benchmarks/out/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (the measuring machinery of benchmarks/run.py)

DEFAULT_OUT = HERE / "out" / "streaming.json"
GOAL_ONE_LAYER_MEMORY = 0.3  # x the model's bytes
GOAL_ONE_LAYER_TIME = 1.0  # x the floor
GOAL_GROWTH_PEAK = 3 * 10**9  # bytes
GOAL_INLINE_TIME = 1.2  # x the floor; memory at most the floor's


def write_chain(path: Path, width: int, depth: int, image: int = 4, seed: int = 0) -> dict[str, Any]:
    """A VGG-like chain: conv 3->W, `depth` 3x3 convs W->W with ReLU, global pooling, Gemm W->10.

    Written with its weights in `path`.data, one tensor at a time at 64 KiB-aligned offsets.
    """
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits: list[TensorProto] = []
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        def add(name: str, array: np.ndarray) -> str:
            nonlocal offset
            offset = -(-offset // 65536) * 65536
            f.seek(offset)
            f.write(array.tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(array.shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                tensor.external_data.add(key=key, value=value)
            inits.append(tensor)
            offset += array.nbytes
            return name

        def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
            out = rng.standard_normal(shape, dtype=np.float32)
            out *= np.float32(std)
            return out

        nodes, x, cin = [], "input", 3
        for k in range(depth + 1):
            w = add(f"conv{k}.weight", normal((width, cin, 3, 3), math.sqrt(2.0 / (cin * 9))))
            b = add(f"conv{k}.bias", normal((width,), 0.01))
            nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{k}_out"], name=f"conv{k}", pads=[1] * 4))
            nodes.append(helper.make_node("Relu", [f"conv{k}_out"], [f"relu{k}_out"], name=f"relu{k}"))
            x, cin = f"relu{k}_out", width
        nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap_out"], name="gap"))
        nodes.append(helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten"))
        fc = add("fc.weight", normal((10, width), math.sqrt(1.0 / width)))
        nodes.append(helper.make_node("Gemm", ["flat_out", fc, add("fc.bias", normal((10,), 0.01))], ["logits"],
                                      name="fc", transB=1))
    graph = helper.make_graph(nodes, "vgg_chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["N", 3, image, image])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnxmorph-bench")
    model.ir_version = 8
    onnx.save(model, str(path))
    return {"path": str(path), "bytes": _files_bytes(path), "width": width, "depth": depth}


def _files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnxmorph", *args]


def _floor(model: Path, out: Path, external: bool) -> list[str]:
    return [sys.executable, "-c", bench.FLOOR_LOAD_SAVE, str(model), str(out), "external" if external else "single"]


def _entry(name: str, m: dict[str, Any], floor: dict[str, Any] | None = None, size: int | None = None) -> dict:
    entry = {"operation": name, **bench._public(m)}
    if floor is not None:
        entry["time_ratio"] = bench._ratio(m["seconds"], floor["seconds"])
        entry["memory_ratio"] = bench._ratio(m["peak_rss_bytes"], floor["peak_rss_bytes"])
    if size:
        entry["memory_vs_model"] = bench._ratio(m["peak_rss_bytes"], size)
    return entry


def _clean(folder: Path, keep: str) -> None:
    for p in folder.iterdir():
        if not p.name.startswith(keep):
            p.unlink()
    # Every command starts with no dirty pages left by the one before (the floor does not fsync:
    # its gigabytes would otherwise be written back during the next measurement).
    os.sync()


def bench_external(work: Path, quick: bool) -> list[dict[str, Any]]:
    width, depth = (256, 12) if quick else (1024, 80)
    info = write_chain(work / "parent.onnx", width, depth)
    _clean(work, "parent.onnx")
    parent, size, middle = Path(info["path"]), info["bytes"], f"conv{depth // 2}"
    commands = {
        "floor": _floor(parent, work / "floor.onnx", True),
        "widen": _cli("widen", str(parent), "--layer", middle, "--width", str(width + width // 4),
                      "-o", str(work / "widen.onnx"), "--no-verify", "-q"),
        "deepen": _cli("deepen", str(parent), "--layer", middle, "-o", str(work / "deepen.onnx"),
                       "--no-verify", "-q"),
    }
    measured = bench.interleaved(commands, 1, bench.ROOT, lambda: _clean(work, "parent.onnx"))
    floor = measured["floor"]
    results = [{"model": "vgg_chain_external", "model_bytes": size, **_entry("floor: onnx.load + onnx.save", floor)}]
    for name in ("widen", "deepen"):
        entry = _entry(name, measured[name], floor, size)
        entry["goal_met"] = (measured[name]["returncode"] == 0 and entry["memory_vs_model"] <= GOAL_ONE_LAYER_MEMORY
                             and entry["time_ratio"] <= GOAL_ONE_LAYER_TIME)
        results.append({"model": "vgg_chain_external", **entry})
    # verify by path: the widened child again (kept this time), then onnxmorph verify of the pair.
    child = work / "widen.onnx"
    bench.measure(commands["widen"], cwd=bench.ROOT)
    verify = bench.measure(_cli("verify", str(parent), str(child), "--trials", "1", "-q"), cwd=bench.ROOT)
    sessions = bench.measure([sys.executable, "-c", bench.FLOOR_SESSIONS, str(parent), str(child), "1x3x4x4"],
                             cwd=bench.ROOT)
    results.append({"model": "vgg_chain_external", **_entry("floor: two onnxruntime sessions", sessions)})
    results.append({"model": "vgg_chain_external", **_entry("verify", verify, sessions, size)})
    _clean(work, "none")
    return results


def bench_growth(work: Path, quick: bool) -> list[dict[str, Any]]:
    width, depth = (256, 8) if quick else (1024, 53)
    info = write_chain(work / "parent.onnx", width, depth)
    _clean(work, "parent.onnx")
    parent, size = Path(info["path"]), info["bytes"]
    floor = bench.measure(_floor(parent, work / "floor.onnx", True), cwd=bench.ROOT)
    _clean(work, "parent.onnx")
    recipe = work / "grow.json"
    recipe.write_text(json.dumps([{"morph": "widen", "layer": f"conv{k}", "width": 2 * width} for k in range(depth)]))
    grow = bench.measure(_cli("apply", str(parent), "--recipe", str(recipe), "-o", str(work / "child.onnx"),
                              "--no-verify", "-q"), cwd=bench.ROOT)
    child_bytes = _files_bytes(work / "child.onnx") if (work / "child.onnx").exists() else 0
    recipe.unlink()
    entry = _entry("widen every conv 2x (recipe)", grow, floor, size)
    entry.update(child_bytes=child_bytes, child_vs_parent=bench._ratio(child_bytes, size),
                 goal_met=grow["returncode"] == 0 and grow["peak_rss_bytes"] < GOAL_GROWTH_PEAK)
    _clean(work, "none")
    return [{"model": "vgg_chain_growth", "model_bytes": size, **_entry("floor: onnx.load + onnx.save (parent)",
                                                                        floor)},
            {"model": "vgg_chain_growth", **entry}]


def bench_inline(work: Path, quick: bool) -> list[dict[str, Any]]:
    scale = 0.125 if quick else 1.0
    path = work / "vgg19.onnx"
    # Built in its own process: this one forks the measured commands and should stay small.
    subprocess.run([sys.executable, __file__, "--build-vgg19", str(path), "--scale", str(scale)], check=True)
    size = path.stat().st_size
    base = max(1, round(512 * scale))
    commands = {
        "floor": _floor(path, work / "floor.onnx", False),
        "widen": _cli("widen", str(path), "--layer", "conv4_2", "--width", str(base + base // 4),
                      "-o", str(work / "widen.onnx"), "--no-verify", "-q"),
        "deepen": _cli("deepen", str(path), "--layer", "conv4_2", "-o", str(work / "deepen.onnx"),
                       "--no-verify", "-q"),
    }
    measured = bench.interleaved(commands, 1 if quick else 2, bench.ROOT, lambda: _clean(work, "vgg19.onnx"))
    floor = measured["floor"]
    results = [{"model": "vgg19_inline", "model_bytes": size, **_entry("floor: onnx.load + onnx.save", floor)}]
    for name in ("widen", "deepen"):
        entry = _entry(name, measured[name], floor, size)
        entry["goal_met"] = (measured[name]["returncode"] == 0 and entry["time_ratio"] <= GOAL_INLINE_TIME
                             and entry["memory_ratio"] <= 1.0)
        results.append({"model": "vgg19_inline", **entry})
    _clean(work, "none")
    return results


def build_vgg19(scale: float) -> onnx.ModelProto:
    """VGG19 (configuration E): 16 3x3 convs, 3 FC; 143.7M parameters (548 MiB) at scale 1."""
    b = bench.bigmodels._Builder(0)
    x, cin = "input", 3
    for block, (base, reps) in enumerate(((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)), start=1):
        for i in range(1, reps + 1):
            cout = max(1, round(base * scale))
            x = b.node("Relu", f"relu{block}_{i}", [b.conv(f"conv{block}_{i}", x, cin, cout, 3)])
            cin = cout
        x = b.node("MaxPool", f"pool{block}", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", "flatten", [x], axis=1)
    fc = max(1, round(4096 * scale))
    x = b.node("Relu", "relu6", [b.gemm("fc6", x, cin * 49, fc)])
    x = b.node("Relu", "relu7", [b.gemm("fc7", x, fc, fc)])
    return b.model("vgg19", 224, b.gemm("fc8", x, fc, 1000, gain=1.0), 1000)


SECTIONS = {"external": bench_external, "growth": bench_growth, "inline": bench_inline}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append")
    parser.add_argument("--work", type=Path, help="folder for the models (default: a temporary one here)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--build-vgg19", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_vgg19:
        onnx.save(build_vgg19(args.scale), str(args.build_vgg19))
        return 0
    work = args.work or HERE / "out" / "streaming-work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": bench.machine(), "quick": args.quick, "sections": {}}
    try:
        for name in args.only or list(SECTIONS):
            results["sections"][name] = SECTIONS[name](work, args.quick)
            print(json.dumps(results["sections"][name], indent=1), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
