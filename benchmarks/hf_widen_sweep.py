"""Sweep: widen every MatMul/Gemm layer of the tiny Hugging Face exports (tests/hf_support.py) and count what verifies.

    python benchmarks/hf_widen_sweep.py gpt2 llama            # both exporters, 1.5x and 2x, a summary per model
    python benchmarks/hf_widen_sweep.py vit --exporter dynamo --factor 2 -v    # one line per layer
    python benchmarks/hf_widen_sweep.py all --json sweep.json

For each kind and exporter the model is exported once (into --cache, reused when present), then
every MatMul/Gemm layer whose output is not a graph output is widened by each factor. A layer
counts as verified when one method gives a child that verifies with onnxruntime at the default
tolerances (`onnxmorph.morph` verifies and raises otherwise): `net2net`, then `lemon`, then
`netmorph` (query/key/value heads need new whole heads whose output rows start at zero, since a
softmax does not keep copies of part of a head: MORPHS.md section 8). The width is `factor` times
the layer's; where a refusal asks for whole blocks (heads of d channels) it is rounded up to the
next multiple of d once. Layers whose every refusal is "graph output ... exposes the channels"
(the channels reach a graph output: the issue's done-criterion leaves them out) are listed apart.
Run with OMP_NUM_THREADS=1 on a shared machine; a dynamo export takes 7-17 s, each widen about 1 s.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

METHODS = ("net2net", "lemon", "netmorph")
KINDS = ("bert", "gpt2", "llama", "vit", "wav2vec2")
REACHES_OUTPUT = re.compile(r"graph output '.*' exposes the channels")
WHOLE = re.compile(r"whole blocks \(a multiple of (\d+)\)")  # heads of d channels: the width rounds up


def candidate_layers(path: Path) -> list[tuple[str, int]]:
    """(name, output channels) of every MatMul/Gemm whose output is not a graph output."""
    import onnxmorph
    from onnxmorph.graph import core as mgraph

    model = onnxmorph.load(str(path), normalize_model=True)
    analysis = mgraph.Analysis(model)
    outputs = {o.name for o in model.graph.output}
    found = []
    for info in mgraph.layers(analysis.view):
        if info.op not in ("MatMul", "Gemm"):
            continue
        node = mgraph.find_layer(analysis.view, info.name)
        shape = analysis.shapes.get(node.outputs[0].name)
        if node.outputs[0].name in outputs or not shape or not shape[-1]:
            continue
        if info.op == "Gemm":
            w = node.inputs[1].values.shape
            found.append((info.name, int(w[0] if int(node.attrs.get("transB", 0)) else w[1])))
        else:
            found.append((info.name, int(shape[-1])))
    return found


def widen_layer(path: Path, layer: str, old: int, factor: float) -> dict:
    """Try each method (and whole blocks once); the first child that verifies wins, else every refusal."""
    import onnxmorph

    width = int(round(old * factor))
    refusals: dict[str, str] = {}
    for method in METHODS:
        tried = set()
        while width not in tried:
            tried.add(width)
            try:
                onnxmorph.morph(str(path), "widen", layer=layer, width=width, method=method)
                return {"layer": layer, "old": old, "width": width, "method": method, "verified": True}
            except onnxmorph.OnnxMorphError as error:
                message = str(error).splitlines()[0]
                refusals[method] = f"{type(error).__name__}: {message}"
                whole = WHOLE.search(message)
                if whole and (width - old) % int(whole.group(1)):
                    block = int(whole.group(1))
                    width = old + math.ceil((width - old) / block) * block
        width = int(round(old * factor))
    reaches = all(REACHES_OUTPUT.search(r) for r in refusals.values())
    return {"layer": layer, "old": old, "width": width, "verified": False, "reaches_output": reaches,
            "refusals": refusals}


def sweep(kind: str, dynamo: bool, factors: list[float], cache: Path, verbose: bool) -> list[dict]:
    import hf_support

    folder = cache / f"{kind}_{'dynamo' if dynamo else 'torchscript'}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}_{'dynamo' if dynamo else 'torchscript'}.onnx"
    if not path.is_file():
        path = hf_support.export(kind, dynamo, folder).path
    layers = candidate_layers(path)
    rows = []
    for factor in factors:
        start = time.perf_counter()
        results = [widen_layer(path, name, old, factor) for name, old in layers]
        counted = [r for r in results if r["verified"] or not r["reaches_output"]]
        ok = sum(r["verified"] for r in counted)
        label = f"{kind} {'dynamo' if dynamo else 'torchscript'} {factor:g}x"
        print(f"{label}: {ok} of {len(counted)} verified ({len(results) - len(counted)} reach a graph output; "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
        for r in results:
            if verbose or not r["verified"] and not r["reaches_output"]:
                what = r["method"] if r["verified"] else ("reaches output" if r["reaches_output"] else
                                                           next(iter(r["refusals"].values()))[:200])
                print(f"    {r['layer']} {r['old']}->{r['width']}: {what}", flush=True)
                if verbose and not r["verified"]:
                    for method, why in r["refusals"].items():
                        print(f"        {method}: {why[:300]}", flush=True)
        rows.append({"kind": kind, "exporter": "dynamo" if dynamo else "torchscript", "factor": factor,
                     "verified": ok, "counted": len(counted), "layers": results})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="+", help=f"models: {', '.join(KINDS)} or all")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript", "both"), default="both")
    parser.add_argument("--factor", type=float, action="append", help="width factors (default 1.5 and 2)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnxmorph-hf-sweep"), help="export folder")
    parser.add_argument("--json", type=Path, help="write every layer's result here")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per layer, every method's refusal")
    args = parser.parse_args(argv)
    kinds = KINDS if args.kinds == ["all"] else args.kinds
    exporters = {"dynamo": [True], "torchscript": [False], "both": [True, False]}[args.exporter]
    rows = []
    for kind in kinds:
        for dynamo in exporters:
            rows += sweep(kind, dynamo, args.factor or [1.5, 2.0], args.cache, args.verbose)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
