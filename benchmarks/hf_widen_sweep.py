"""Sweep: the tiny Hugging Face families (tests/hf_support.py): what inspect reads, which blocks grow, what widens.

    python benchmarks/hf_widen_sweep.py gpt2 llama            # both exporters, 1.5x and 2x, a summary per model
    python benchmarks/hf_widen_sweep.py vit --exporter dynamo --factor 2 -v    # one line per layer
    python benchmarks/hf_widen_sweep.py all --json sweep.json --table table.md # every family, the docs' table

For each kind and exporter the model is exported once (into --cache, reused when present). Structure: inspect's
blocks and attention modules against the family's facts (blocks, heads, head size, key/value heads), and `block
--after` on every listed block (verified). Width: every MatMul/Gemm layer whose output is not a graph output is
widened by each factor. A layer counts as verified when one method gives a child that verifies with onnxruntime
at the default tolerances (`onnxmorph.morph` verifies and raises otherwise): `net2net`, then `lemon`, then
`netmorph` (query/key/value heads need new whole heads whose output rows start at zero, since a softmax does not
keep copies of part of a head: MORPHS.md section 8). The width is `factor` times the layer's; where a refusal
asks for whole blocks (heads of d channels) it is rounded up to the next multiple of d once. Layers whose every
refusal is "graph output ... exposes the channels" (the channels reach a graph output) are listed apart. A child
that a method wrote but that did not verify is counted as *wrong* (the analysis should have refused): there must
be none. Run with OMP_NUM_THREADS=1 on a shared machine; a dynamo export takes 7-17 s, each widen about 1 s.
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
KINDS = ("bert", "gpt2", "llama", "vit", "wav2vec2")  # `all` is every family of tests/hf_support.py
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
    wrong: list[str] = []
    for method in METHODS:
        tried = set()
        while width not in tried:
            tried.add(width)
            try:
                onnxmorph.morph(str(path), "widen", layer=layer, width=width, method=method)
                return {"layer": layer, "old": old, "width": width, "method": method, "verified": True,
                        "wrong": wrong}
            except onnxmorph.OnnxMorphError as error:
                message = str(error).splitlines()[0]
                refusals[method] = f"{type(error).__name__}: {message}"
                if isinstance(error, onnxmorph.VerificationFailed):
                    wrong.append(f"{method} {width}: {message}")
                whole = WHOLE.search(message)
                if whole and (width - old) % int(whole.group(1)):
                    block = int(whole.group(1))
                    width = old + math.ceil((width - old) / block) * block
        width = int(round(old * factor))
    reaches = all(REACHES_OUTPUT.search(r) for r in refusals.values())
    return {"layer": layer, "old": old, "width": width, "verified": False, "reaches_output": reaches,
            "refusals": refusals, "wrong": wrong}


def exported(kind: str, dynamo: bool, cache: Path) -> Path:
    """The export of `kind` in `cache` (made when missing)."""
    import hf_support

    folder = cache / f"{kind}_{'dynamo' if dynamo else 'torchscript'}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}_{'dynamo' if dynamo else 'torchscript'}.onnx"
    if not path.is_file():
        path = hf_support.export(kind, dynamo, folder).path
    return path


def expected_heads(fact: dict) -> list[tuple[int, int, int]]:
    """(heads, head size, key/value heads) per block from a family's facts (Swin: per stage)."""
    stages = fact.get("stages") or ((fact["layers"], fact["hidden_size"], fact["heads"]),)
    return [(heads, width // heads, fact["kv_heads"] if len(stages) == 1 else heads)
            for blocks, width, heads in stages for _ in range(blocks)]


def structure(kind: str, path: Path) -> dict:
    """inspect's blocks and attention against the family's facts, and `block --after` on every listed block."""
    import hf_support

    import onnxmorph

    fact = hf_support.facts(kind)
    info = onnxmorph.inspect(onnxmorph.load(str(path)))
    heads = [(a["heads"], a["head_dim"], a["kv_heads"]) for a in info["attention"]]
    grown, refused = 0, {}
    for block in info["blocks"]:
        try:
            onnxmorph.morph(str(path), "block", after=block["after"])
            grown += 1
        except onnxmorph.OnnxMorphError as error:
            refused[block["after"]] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return {"blocks_expected": fact["layers"], "blocks": len(info["blocks"]), "grown": grown,
            "kinds": sorted({b["kind"] for b in info["blocks"]}),
            "parallel": any(b.get("parallel") for b in info["blocks"]),
            "experts": max([b.get("experts") or 0 for b in info["blocks"]] or [0]),
            "heads_right": heads == expected_heads(fact), "heads": heads, "block_refusals": refused}


def sweep(kind: str, dynamo: bool, factors: list[float], cache: Path, verbose: bool) -> list[dict]:
    path = exported(kind, dynamo, cache)
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
                     "verified": ok, "counted": len(counted), "wrong": sum(bool(r["wrong"]) for r in results),
                     "layers": results})
    return rows


def table(families: list[dict]) -> str:
    """The markdown table of docs/families.md: one row per family and exporter."""
    lines = ["| family | exporter | blocks grown | heads read | widen 2x | widen 1.5x | wrong |",
             "|---|---|---|---|---|---|---|"]
    for f in families:
        width = {row["factor"]: f"{row['verified']} of {row['counted']}" for row in f["widen"]}
        wrong = sum(row["wrong"] for row in f["widen"])
        s = f["structure"]
        heads = "yes" if s["heads_right"] else "no"
        lines.append(f"| {f['kind']} | {f['exporter']} | {s['grown']} of {s['blocks']} ({s['blocks_expected']} layers)"
                     f" | {heads} | {width.get(2.0, '-')} | {width.get(1.5, '-')} | {wrong} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="+", help=f"models: {', '.join(KINDS)} or all")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript", "both"), default="both")
    parser.add_argument("--factor", type=float, action="append", help="width factors (default 1.5 and 2)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnxmorph-hf-sweep"), help="export folder")
    parser.add_argument("--json", type=Path, help="write every layer's result here")
    parser.add_argument("--table", type=Path, help="write the per-family markdown table here")
    parser.add_argument("--no-structure", action="store_true", help="widen only (no inspect and block checks)")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per layer, every method's refusal")
    args = parser.parse_args(argv)
    if args.kinds == ["all"]:
        import hf_support

        kinds = list(hf_support.ALL_KINDS)
    else:
        kinds = args.kinds
    exporters = {"dynamo": [True], "torchscript": [False], "both": [False, True]}[args.exporter]
    rows, families = [], []
    for kind in kinds:
        for dynamo in exporters:
            found = None
            if not args.no_structure:
                found = structure(kind, exported(kind, dynamo, args.cache))
                print(f"{kind} {'dynamo' if dynamo else 'torchscript'}: blocks {found['grown']} of "
                      f"{found['blocks']} grown ({found['blocks_expected']} layers), heads "
                      f"{'right' if found['heads_right'] else 'WRONG ' + str(found['heads'])}", flush=True)
                for after, why in found["block_refusals"].items():
                    print(f"    block {after}: {why[:200]}", flush=True)
            widened = sweep(kind, dynamo, args.factor or [1.5, 2.0], args.cache, args.verbose)
            rows += widened
            families.append({"kind": kind, "exporter": "dynamo" if dynamo else "torchscript", "structure": found,
                             "widen": [{k: v for k, v in r.items() if k != "layers"} for r in widened]})
    if args.json:
        args.json.write_text(json.dumps({"families": families, "rows": rows}, indent=1))
    if args.table and not args.no_structure:
        args.table.write_text(table(families))
    return 0


if __name__ == "__main__":
    sys.exit(main())
