"""Benchmark: `onnxmorph grow` of a GPT-2-small-sized graph to 2x hidden/heads/FFN, against HyperCloning in PyTorch.

    python benchmarks/grow_hypercloning.py            # 124M -> 495M parameters: a few GB of RAM and disk, minutes
    python benchmarks/grow_hypercloning.py --quick    # a 2-block toy of the same code paths, seconds

Builds Hugging Face's GPT2LMHeadModel from a GPT2Config (random seeded weights, never a download), saves
its weights and exports it with the TorchScript exporter (`dynamo=False`). Then, each in its own process
(peak RSS from wait4, see benchmarks/run.py):

* onnxmorph: `grow parent.onnx --hidden 2x --heads 2x --ffn 2x -o child.onnx` (verified, the default),
  and the same with `--no-verify`;
* the baseline, what a PyTorch user of HyperCloning does (Samragh et al. 2024, apple/ml-hypercloning;
  written here from the paper's construction, not copied): load the saved weights, build the 2x model
  from its config, fill every weight with the tiled parent's (an input axis that doubles halves the
  weight: each of q, k, v of GPT-2's fused c_attn tiled on its own, so the heads are cloned; the
  embeddings repeated, the untied LM head halved), check that its logits equal the parent's, and
  `torch.onnx.export` it (`dynamo=False`) to ONNX.

`onnxmorph verify PARENT CHILD --trials 1` then checks both ONNX children against the parent (not
timed in the comparison; --quick leaves out `--no-verify` and this second check of grow's child).
Results go to benchmarks/grow_hypercloning_results.json (--quick: benchmarks/out/grow_hypercloning_quick.json
unless -o says otherwise); the models are deleted at the end.
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
DEFAULT_OUT = HERE / "grow_hypercloning_results.json"
QUICK_OUT = HERE / "out" / "grow_hypercloning_quick.json"


def _load_run() -> Any:
    spec = importlib.util.spec_from_file_location("onnxmorph_bench_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


bench = _load_run()

# Shared by the build and the baseline: the wrapper that both exports use, so that the ONNX interfaces match.
COMMON = """
import json, os, sys, time, warnings
import torch, transformers

class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

def export(model, path, vocab):
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model).eval(), (ids, torch.ones_like(ids)), path, output_names=["logits"],
                          input_names=["input_ids", "attention_mask"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes})
"""

BUILD = COMMON + """
folder, layers, embd, heads, vocab, positions = sys.argv[1], *map(int, sys.argv[2:7])
torch.manual_seed(0)
config = transformers.GPT2Config(n_embd=embd, n_layer=layers, n_head=heads, vocab_size=vocab,
                                 n_positions=positions, bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(config).eval()
config.save_pretrained(folder)
torch.save(model.state_dict(), os.path.join(folder, "weights.pt"))
export(model, os.path.join(folder, "parent.onnx"), vocab)
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
"""

# The baseline: HyperCloning's 2x expansion of GPT-2 written out in PyTorch. A weight whose input axis
# doubles reads [x, x], so it is tiled and halved along that axis; one whose output axis doubles writes
# [y, y]. GPT-2's Conv1D keeps weights as (in, out) and c_attn holds q, k and v side by side.
BASELINE = COMMON + """
folder, out = sys.argv[1], sys.argv[2]
start = time.perf_counter()
config = transformers.GPT2Config.from_pretrained(folder)
parent = transformers.GPT2LMHeadModel(config).eval()
parent.load_state_dict(torch.load(os.path.join(folder, "weights.pt"), mmap=True), assign=True)
parent.tie_weights()
loaded = time.perf_counter()

wide = transformers.GPT2Config.from_pretrained(folder)
inner = config.n_inner or 4 * config.n_embd
wide.n_embd, wide.n_head, wide.n_inner = 2 * config.n_embd, 2 * config.n_head, 2 * inner
wide.tie_word_embeddings = False  # the embedding is repeated, the head halved: no longer one matrix
child = transformers.GPT2LMHeadModel(wide).eval()

def tiled(w, rows, cols):
    # (in, out) Conv1D weight: `rows` copies along the input axis (halved), `cols` along the output axis
    return w.repeat(rows, cols) / rows

def put(param, value):
    assert param.shape == value.shape, (param.shape, value.shape)
    param.copy_(value)

with torch.no_grad():
    src, dst = parent.transformer, child.transformer
    put(dst.wte.weight, src.wte.weight.repeat(1, 2))
    put(dst.wpe.weight, src.wpe.weight.repeat(1, 2))
    for a, b in zip(src.h, dst.h):
        for norm in ("ln_1", "ln_2"):
            put(getattr(b, norm).weight, getattr(a, norm).weight.repeat(2))
            put(getattr(b, norm).bias, getattr(a, norm).bias.repeat(2))
        q, k, v = a.attn.c_attn.weight.split(config.n_embd, dim=1)
        put(b.attn.c_attn.weight, torch.cat([tiled(w, 2, 2) for w in (q, k, v)], dim=1))
        put(b.attn.c_attn.bias, torch.cat([p.repeat(2) for p in a.attn.c_attn.bias.split(config.n_embd)]))
        for old, new in ((a.attn.c_proj, b.attn.c_proj), (a.mlp.c_fc, b.mlp.c_fc), (a.mlp.c_proj, b.mlp.c_proj)):
            put(new.weight, tiled(old.weight, 2, 2))
            put(new.bias, old.bias.repeat(2))
    put(dst.ln_f.weight, src.ln_f.weight.repeat(2))
    put(dst.ln_f.bias, src.ln_f.bias.repeat(2))
    put(child.lm_head.weight, parent.lm_head.weight.repeat(1, 2) / 2)
cloned = time.perf_counter()

ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    a = parent(input_ids=ids, use_cache=False).logits
    b = child(input_ids=ids, use_cache=False).logits
error = float((a - b).abs().max())
assert error <= 1e-3 * max(1.0, float(a.abs().max())), f"the clone differs from the parent: {error}"
checked = time.perf_counter()
del parent
export(child, out, config.vocab_size)
print(json.dumps({"parameters": sum(p.numel() for p in child.parameters()), "max_abs_error": error,
                  "seconds": {"load": loaded - start, "clone": cloned - loaded, "check": checked - cloned,
                              "export": time.perf_counter() - checked}}))
"""


def _size(path: Path) -> int:
    """Bytes of a model file and of the external data files beside it, if any."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def _public(m: dict[str, Any]) -> dict[str, Any]:
    out = {"seconds": round(m["seconds"], 3), "peak_rss_bytes": m["peak_rss_bytes"], "returncode": m["returncode"]}
    if m["returncode"]:
        out["error"] = (m["stderr"].strip().splitlines() or [""])[-1]
    return out


def build(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The parent: its weights for the baseline, its ONNX export for onnxmorph."""
    folder = work / "parent"
    folder.mkdir()
    sizes = [args.layers, args.embd, args.heads, args.vocab, args.positions]
    result = bench.measure([sys.executable, "-c", BUILD, str(folder), *map(str, sizes)])
    if result["returncode"] != 0:
        raise RuntimeError(f"building the model failed: {result['stderr'][-800:]}")
    info = json.loads(result["stdout"].strip().splitlines()[-1])
    info.update(path=str(folder / "parent.onnx"), file_bytes=(folder / "parent.onnx").stat().st_size,
                export=_public(result), n_layer=args.layers, n_embd=args.embd, n_head=args.heads,
                vocab_size=args.vocab, n_positions=args.positions)
    return info


def measure_all(model: dict[str, Any], work: Path, quick: bool = False) -> dict[str, Any]:
    """grow (verified and not), the PyTorch baseline, and a check of both children against the parent.

    `quick` leaves out what only repeats a code path: grow without verification, and verifying grow's
    child again (grow verified it before writing it)."""
    parent = Path(model["path"])
    out: dict[str, Any] = {}
    children: dict[str, Path] = {}
    for label, extra in (("grow", []), ("grow_no_verify", ["--no-verify"]))[:1 if quick else 2]:
        child = work / label / "child.onnx"
        child.parent.mkdir()
        run = bench.measure([sys.executable, "-m", "onnxmorph", "grow", str(parent), "--hidden", "2x", "--heads",
                             "2x", "--ffn", "2x", "-o", str(child), "-q", *extra], cwd=bench.ROOT)
        out[label] = _public(run)
        if run["returncode"] == 0:
            out[label]["child_bytes"] = _size(child)
            children[label] = child
    baseline_child = work / "hypercloning" / "child.onnx"
    baseline_child.parent.mkdir()
    run = bench.measure([sys.executable, "-c", BASELINE, str(parent.parent), str(baseline_child)])
    out["hypercloning"] = _public(run)
    if run["returncode"] == 0:
        figures = json.loads(run["stdout"].strip().splitlines()[-1])
        out["hypercloning"].update(figures, child_bytes=_size(baseline_child))
        out["hypercloning"]["seconds_inside"] = {k: round(v, 3) for k, v in out["hypercloning"]["seconds"].items()}
        out["hypercloning"]["seconds"] = round(run["seconds"], 3)
        children["hypercloning"] = baseline_child
    for label, child in children.items():
        if label == "grow_no_verify" or (quick and label == "grow"):
            continue  # the same child as grow's, written without the check; or checked by grow itself
        check = bench.measure([sys.executable, "-m", "onnxmorph", "verify", str(parent), str(child), "--trials", "1",
                               "-q"], cwd=bench.ROOT)
        out[label]["verify_against_parent"] = _public(check)
    if "grow" in children and "hypercloning" in children:
        base = out["hypercloning"]
        for label in ("grow", "grow_no_verify"):
            if label in children:
                mine = out[label]
                mine["time_vs_hypercloning"] = bench._ratio(mine["seconds"], base["seconds"])
                mine["memory_vs_hypercloning"] = bench._ratio(mine["peak_rss_bytes"], base["peak_rss_bytes"])
    return out


def summary(results: dict[str, Any]) -> str:
    """The table printed at the end."""
    m, r = results["model"], results["result"]
    mb = bench._mb
    lines = [f"GPT-2-sized graph: {m['parameters'] / 1e6:.1f}M parameters, n_embd {m['n_embd']}, {m['n_layer']} "
             f"blocks, {mb(m['file_bytes'])} (export {m['export']['seconds']:.1f} s); grown to 2x hidden, heads, FFN",
             f"  {'command':44s} {'seconds':>8s} {'peak RSS':>9s} {'child':>9s}  vs HyperCloning (time, memory)"]
    rows = (("onnxmorph grow (verified)", "grow"), ("onnxmorph grow --no-verify", "grow_no_verify"),
            ("HyperCloning in PyTorch + torch.onnx.export", "hypercloning"))
    for label, key in rows:
        if key not in r:
            continue
        e = r[key]
        if e["returncode"]:
            lines.append(f"  {label:44s} FAILED (exit {e['returncode']}): {e['error']}")
            continue
        ratio = (f"  {e['time_vs_hypercloning']:.2f}x, {e['memory_vs_hypercloning']:.2f}x"
                 if "time_vs_hypercloning" in e else "")
        lines.append(f"  {label:44s} {e['seconds']:8.2f} {mb(e['peak_rss_bytes']):>9s} {mb(e['child_bytes']):>9s}"
                     + ratio)
    base = r["hypercloning"]
    if not base["returncode"]:
        inside = ", ".join(f"{k} {v:.1f} s" for k, v in base["seconds_inside"].items())
        lines.append(f"  HyperCloning: {base['parameters'] / 1e6:.1f}M parameters, logits equal to the parent's "
                     f"(max abs error {base['max_abs_error']:.1e}); inside: {inside}")
    for key in ("grow", "hypercloning"):
        check = r[key].get("verify_against_parent")
        if check:
            lines.append(f"  verify parent {key} child --trials 1: "
                         + ("PASS" if not check["returncode"] else f"FAILED: {check.get('error')}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-block toy (n_embd 64, vocab 1000): seconds")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--embd", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--positions", type=int)
    parser.add_argument("-o", "--output", type=Path, help=f"JSON file (default {DEFAULT_OUT}; --quick: {QUICK_OUT})")
    parser.add_argument("--workdir", type=Path, help="parent folder of the temporary models (default: the system's)")
    args = parser.parse_args(argv)
    sizes = dict(layers=2, embd=64, heads=4, vocab=1000, positions=64) if args.quick else \
        dict(layers=12, embd=768, heads=12, vocab=50257, positions=1024)
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    output = args.output or (QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="onnxmorph-grow-", dir=args.workdir))
    try:
        print("exporting the parent ...", file=sys.stderr, flush=True)
        model = build(work, args)
        print("growing both ways and measuring ...", file=sys.stderr, flush=True)
        result = measure_all(model, work, args.quick)
        results = {"machine": bench.machine(), "quick": args.quick, "model": model, "result": result}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"wrote {output}")
    failed = [k for k, v in results["result"].items() if v["returncode"] or v.get("verify_against_parent", {})
              .get("returncode")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
