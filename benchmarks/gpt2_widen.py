"""Benchmark: a GPT-2-small-sized graph grown to 2x hidden width through the CLI, against onnx.load + onnx.save.

    python benchmarks/gpt2_widen.py                 # 124M parameters, a few GB of RAM and disk, minutes
    python benchmarks/gpt2_widen.py --layers 2 --embd 64 --vocab 1000   # a smoke run, seconds

Builds Hugging Face's GPT2LMHeadModel from a GPT2Config (random seeded weights, never a download),
exports it with the TorchScript exporter (`dynamo=False`), widens one writer of the residual stream
(block 0's attention output projection) to twice the width with `widen --method net2net --no-verify`
(tiling: the whole stream doubles), and measures, each command in its own process (peak RSS from
wait4, see benchmarks/run.py): the morph, the floor (`onnx.load` + `onnx.save` of the child, with
external data where onnxmorph wrote it so), and `verify PARENT CHILD --trials 1` once. A refused
morph is reported with its one-line reason; the floor is then measured on the parent and `verify`
is not run. Results go to benchmarks/gpt2_widen_results.json; the models are deleted at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "gpt2_widen_results.json"


def _load_run() -> Any:
    spec = importlib.util.spec_from_file_location("onnxmorph_bench_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


bench = _load_run()

# Run in its own process: torch and the export's copies stay out of every measured command.
BUILD = """
import json, os, sys, warnings
import onnx, torch, transformers
path, layers, embd, heads, vocab, positions = sys.argv[1], *map(int, sys.argv[2:7])
torch.manual_seed(0)
config = transformers.GPT2Config(n_embd=embd, n_layer=layers, n_head=heads, vocab_size=vocab,
                                 n_positions=positions, bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(config).eval()

class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

ids = torch.randint(0, vocab, (1, 16))
axes = {0: "batch", 1: "sequence"}
with warnings.catch_warnings(), torch.no_grad():
    warnings.simplefilter("ignore")
    torch.onnx.export(Logits(model).eval(), (ids, torch.ones_like(ids)), path, output_names=["logits"],
                      input_names=["input_ids", "attention_mask"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes})
graph = onnx.load(path, load_external_data=False).graph
writer = next(n.name for n in graph.node if "h.0/attn/c_proj" in n.name and n.op_type in ("Gemm", "MatMul"))
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "file_bytes": os.path.getsize(path),
                  "layer": writer}))
"""


def _size(path: Path) -> int:
    """Bytes of a model file and its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _public(m: dict[str, Any]) -> dict[str, Any]:
    out = {"seconds": round(m["seconds"], 3), "peak_rss_bytes": m["peak_rss_bytes"], "returncode": m["returncode"]}
    if m["returncode"]:
        out["error"] = (m["stderr"].strip().splitlines() or [""])[-1]
    return out


def build(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Export the GPT-2-sized model into `work`: its size, parameter count and the writer to widen."""
    path = work / "gpt2.onnx"
    sizes = [args.layers, args.embd, args.heads, args.vocab, args.positions]
    result = bench.measure([sys.executable, "-c", BUILD, str(path), *map(str, sizes)])
    if result["returncode"] != 0:
        raise RuntimeError(f"building the model failed: {result['stderr'][-500:]}")
    info = json.loads(result["stdout"].strip().splitlines()[-1])
    info.update(path=str(path), export=_public(result), n_layer=args.layers, n_embd=args.embd, n_head=args.heads,
                vocab_size=args.vocab, n_positions=args.positions)
    return info


def measure_all(model: dict[str, Any], work: Path, width: int) -> dict[str, Any]:
    """The morph, the load + save floor (of the child, or of the parent if refused) and verify once."""
    parent, child = Path(model["path"]), work / "child" / "gpt2_wide.onnx"
    child.parent.mkdir()
    morph = bench.measure([sys.executable, "-m", "onnxmorph", "widen", str(parent), "--layer", model["layer"],
                           "--width", str(width), "--method", "net2net", "-o", str(child), "--no-verify", "-q"],
                          cwd=bench.ROOT)
    made = morph["returncode"] == 0 and child.is_file()
    subject = child if made else parent
    external = subject.with_name(subject.name + ".data").is_file()
    floor = bench.measure([sys.executable, "-c", bench.FLOOR_LOAD_SAVE, str(subject), str(work / "floor.onnx"),
                           "external" if external else "single"])
    out: dict[str, Any] = {
        "width": width, "morph": _public(morph), "child_made": made,
        "floor": dict(_public(floor), of="child" if made else "parent (no child: the morph was refused)",
                      external_data=external, file_bytes=_size(subject)),
    }
    if made:
        out["child_file_bytes"] = _size(child)
        out["time_ratio"] = bench._ratio(morph["seconds"], floor["seconds"])
        out["memory_ratio"] = bench._ratio(morph["peak_rss_bytes"], floor["peak_rss_bytes"])
        verify = bench.measure([sys.executable, "-m", "onnxmorph", "verify", str(parent), str(child),
                                "--trials", "1", "-q"], cwd=bench.ROOT)
        out["verify"] = _public(verify)
    return out


def summary(results: dict[str, Any]) -> str:
    """The table printed at the end."""
    m, r = results["model"], results["result"]
    mb = bench._mb
    lines = [f"GPT-2-sized graph: {m['parameters'] / 1e6:.1f}M parameters, n_embd {m['n_embd']}, {m['n_layer']} "
             f"layers, {mb(m['file_bytes'])} (export {m['export']['seconds']:.1f} s); widen {m['layer']} "
             f"to {r['width']} (net2net, --no-verify)",
             f"  {'command':34s} {'seconds':>8s} {'peak RSS':>9s}"]
    floor = r["floor"]
    rows = [("widen", r["morph"]), (f"floor: load + save of the {'child' if r['child_made'] else 'parent'}", floor)]
    if "verify" in r:
        rows.append(("verify PARENT CHILD --trials 1", r["verify"]))
    for label, e in rows:
        lines.append(f"  {label:34s} {e['seconds']:8.2f} {mb(e['peak_rss_bytes']):>9s}"
                     + (f"  FAILED (exit {e['returncode']}): {e['error']}" if e["returncode"] else ""))
    if r["child_made"]:
        lines.append(f"  child {mb(r['child_file_bytes'])}{' (external data)' if floor['external_data'] else ''}; "
                     f"widen vs floor: time {r['time_ratio']:.2f}x, memory {r['memory_ratio']:.2f}x")
    else:
        lines.append("  no child: the morph was refused, so there is no time or memory ratio and no verify")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    parser.add_argument("--workdir", type=Path, help="parent folder of the temporary models (default: the system's)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="onnxmorph-gpt2-", dir=args.workdir))
    try:
        print("exporting the model ...", file=sys.stderr, flush=True)
        model = build(work, args)
        print("widening and measuring ...", file=sys.stderr, flush=True)
        results = {"machine": bench.machine(), "model": model, "result": measure_all(model, work, 2 * args.embd)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
