"""Growing checkpoint-sized models in bounded memory: each morph beside the floor, measured in one run.

    python benchmarks/memory.py                      # every section at full size (~45 GB of disk at peak)
    python benchmarks/memory.py --only growth        # one section: onefile | growth | halves | regions | cli | verify
    python benchmarks/memory.py --quick              # the same commands on models of a few MB (seconds)
    python benchmarks/memory.py --before /tmp/old    # also run the commands with the code at /tmp/old

Every command is its own process (peak RSS from wait4, see benchmarks/run.py); the floor is
`onnx.load` + `onnx.save` of the child (with external data), measured in the same run. The
models are Llama-style decoders of random weights written tensor by tensor (benchmarks/llama.py),
in `--work` (default: a temporary folder), and deleted at the end. Results go to
benchmarks/memory_results.json (--quick: benchmarks/out/memory_quick.json).

Sections:
* onefile: a 0.5B float32 parent saved as one file and the same weights with external data,
  each grown to twice its hidden width (net2net on block 0's attention output projection tiles
  the whole residual stream), `--no-verify`; goal: one file's peak RSS <= 1.2x external data's.
* growth: the same 2x hidden growth of a 0.70B (2.8 GB) parent with external data; goal: peak
  RSS <= 2.5 GiB and time <= 1.0x the floor.
* halves: a 0.1B parent in float16 and in bfloat16, widened 2x and given a block, each verified
  (bfloat16 on float32 copies: onnxruntime has no CPU kernels for it).
* regions: a Llama-2-7B-shaped float16 parent (13.5 GB) given 8 LLaMA Pro identity blocks by one
  recipe, verified by regions (the model is larger than the verification budget); goal: peak RSS
  < 3 GiB.
* cli: `inspect` of a small model against `python -c "import onnx, onnxruntime"` (median of
  repeated runs); goal: within 1.2x. Also what `import onnx` costs, and how much of it ml_dtypes.
* verify: a ResNet-50 deepen verified whole and by regions, beside two bare onnxruntime sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llama  # noqa: E402  (the model writer beside this script)
import run as bench  # noqa: E402  (the measuring machinery of benchmarks/run.py)

DEFAULT_OUT = HERE / "memory_results.json"
QUICK_OUT = HERE / "out" / "memory_quick.json"
GOAL_ONEFILE_VS_EXTERNAL = 1.2  # peak RSS ratio
GOAL_GROWTH_PEAK = 2.5 * 2**30  # bytes
GOAL_GROWTH_TIME = 1.0  # x the floor
GOAL_REGIONS_PEAK = 3 * 2**30  # bytes
GOAL_CLI = 1.2  # x `import onnx, onnxruntime`

SIZES = {  # section -> (full size, quick size)
    "onefile": ("0.5b", "small"),
    "growth": ("1b", "small"),
    "halves": (llama.LlamaShape(hidden=768, layers=8, heads=12, intermediate=2048, vocab=32000), "small"),
    "regions": ("7b", llama.LlamaShape(hidden=64, layers=8, heads=4, intermediate=160, vocab=256)),
}


def _shape(section: str, quick: bool) -> llama.LlamaShape:
    choice = SIZES[section][1 if quick else 0]
    return llama.PRESETS[choice] if isinstance(choice, str) else choice


def _python(code: str | None = None) -> list[str]:
    return [sys.executable] + (["-c", code] if code else [])


class Runner:
    """Runs commands with this checkout's onnxmorph, and with `before` (another checkout) where asked."""

    def __init__(self, before: Path | None) -> None:
        self.before = before

    def measure(self, args: Sequence[str], *, code: Path | None = None,
                env: dict[str, str | None] | None = None) -> dict[str, Any]:
        """`args` measured with `code` first on the path and the variables of `env` set (None: unset)."""
        changes: dict[str, str | None] = {
            "PYTHONPATH": os.pathsep.join(p for p in (str(code or bench.ROOT), os.environ.get("PYTHONPATH")) if p),
            **(env or {})}
        saved = {key: os.environ.get(key) for key in changes}
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        try:
            # run in the code's own folder: `python -m` looks in the current folder first
            return bench.measure(list(args), cwd=code or bench.ROOT, stdout_tail=2**24)  # a JSON report whole
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def cli(self, *args: str, code: Path | None = None) -> dict[str, Any]:
        return self.measure([sys.executable, "-m", "onnxmorph", *args], code=code)


def _write(work: Path, name: str, shape: llama.LlamaShape, **options: Any) -> dict[str, Any]:
    """Write a parent in its own process (this one forks the measured commands and must stay small)."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import llama; "
            "shape = llama.LlamaShape(**json.loads(sys.argv[3])); "
            "print(json.dumps(llama.write_llama(sys.argv[2], shape, **json.loads(sys.argv[4]))))")
    result = bench.measure(_python(code) + [str(HERE), str(folder / "model.onnx"), json.dumps(asdict(shape)),
                                            json.dumps(options)])
    if result["returncode"] != 0:
        raise RuntimeError(f"writing {name} failed: {result['stderr'][-800:]}")
    info = json.loads(result["stdout"].strip().splitlines()[-1])
    info["write_seconds"] = round(result["seconds"], 1)
    return info


def _files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _entry(label: str, m: dict[str, Any], floor: dict[str, Any] | None = None) -> dict[str, Any]:
    entry = {"operation": label, **bench._public(m)}
    if floor is not None and floor.get("returncode") == 0:
        entry["time_vs_floor"] = bench._ratio(m["seconds"], floor["seconds"])
        entry["memory_vs_floor"] = bench._ratio(m["peak_rss_bytes"], floor["peak_rss_bytes"])
    return entry


def _floor(runner: Runner, child: Path, work: Path) -> dict[str, Any]:
    """onnx.load + onnx.save of `child` (with external data), then the copy removed."""
    out = work / "floor" / "floor.onnx"
    out.parent.mkdir(exist_ok=True)
    result = runner.measure(_python(bench.FLOOR_LOAD_SAVE) + [str(child), str(out), "external"])
    shutil.rmtree(out.parent, ignore_errors=True)
    os.sync()
    return result


def _writer(shape: llama.LlamaShape) -> str:
    return "/model/layers.0/self_attn/o_proj/MatMul"


def _widen(runner: Runner, parent: Path, out: Path, shape: llama.LlamaShape, *extra: str,
           code: Path | None = None) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    result = runner.cli("widen", str(parent), "--layer", _writer(shape), "--width", str(2 * shape.hidden),
                        "--method", "net2net", "-o", str(out), "-q", *extra, code=code)
    result["child_bytes"] = _files_bytes(out) if out.exists() else 0
    os.sync()
    return result


# --------------------------------------------------------------------------- sections


def bench_onefile(runner: Runner, work: Path, quick: bool) -> list[dict[str, Any]]:
    shape = _shape("onefile", quick)
    one = _write(work, "onefile", shape, one_file=True)
    ext = _write(work, "external", shape)
    results: list[dict[str, Any]] = [{"model": "parent", "parameters": one["parameters"],
                                      "one_file_bytes": one["bytes"], "external_bytes": ext["bytes"],
                                      "shape": asdict(shape)}]
    label = "widen 2x hidden (net2net), --no-verify"
    child = work / "children" / "child.onnx"
    widened = {"external": _widen(runner, Path(ext["path"]), child, shape, "--no-verify")}
    floor = _floor(runner, child, work)
    shutil.rmtree(child.parent, ignore_errors=True)
    widened["one file"] = _widen(runner, Path(one["path"]), child, shape, "--no-verify")
    shutil.rmtree(child.parent, ignore_errors=True)
    for name in ("external", "one file"):
        results.append({"parent": name, **_entry(label, widened[name], floor),
                        "child_bytes": widened[name]["child_bytes"]})
    results.append({"parent": "external", **_entry("floor: onnx.load + onnx.save of the child", floor)})
    if runner.before is not None:
        old = _widen(runner, Path(ext["path"]), child, shape, "--no-verify", code=runner.before)
        results.append({"parent": "external", "code": "before", **_entry(label, old, floor)})
        shutil.rmtree(child.parent, ignore_errors=True)
    ratio = bench._ratio(widened["one file"]["peak_rss_bytes"], widened["external"]["peak_rss_bytes"])
    results.append({"measure": "peak RSS, one file / external data", "ratio": ratio,
                    "goal": GOAL_ONEFILE_VS_EXTERNAL,
                    "goal_met": ratio <= GOAL_ONEFILE_VS_EXTERNAL and all(
                        w["returncode"] == 0 for w in widened.values())})
    return results


def bench_growth(runner: Runner, work: Path, quick: bool) -> list[dict[str, Any]]:
    shape = _shape("growth", quick)
    info = _write(work, "growth", shape)
    parent = Path(info["path"])
    child = work / "children" / "growth" / "child.onnx"
    grow = _widen(runner, parent, child, shape, "--no-verify")
    floor = _floor(runner, child, work)
    entry = _entry("widen 2x hidden (net2net), --no-verify", grow, floor)
    entry.update(child_bytes=grow["child_bytes"], goal_peak_bytes=GOAL_GROWTH_PEAK, goal_time_vs_floor=GOAL_GROWTH_TIME,
                 goal_met=grow["returncode"] == 0 and grow["peak_rss_bytes"] <= GOAL_GROWTH_PEAK
                 and entry.get("time_vs_floor", 99) <= GOAL_GROWTH_TIME)
    results = [{"model": "parent", "parameters": info["parameters"], "bytes": info["bytes"], "shape": asdict(shape)},
               entry, _entry("floor: onnx.load + onnx.save of the child", floor)]
    verify = runner.cli("verify", str(parent), str(child), "--trials", "1", "-q")
    results.append(_entry("verify PARENT CHILD --trials 1 (run whole)", verify))
    if runner.before is not None:
        shutil.rmtree(child.parent, ignore_errors=True)
        old = _widen(runner, parent, child, shape, "--no-verify", code=runner.before)
        results.append({"code": "before", **_entry("widen 2x hidden (net2net), --no-verify", old, floor)})
    shutil.rmtree(work / "children", ignore_errors=True)
    return results


def bench_halves(runner: Runner, work: Path, quick: bool) -> list[dict[str, Any]]:
    shape = _shape("halves", quick)
    results: list[dict[str, Any]] = []
    for dtype in ("float16", "bfloat16"):
        info = _write(work, dtype, shape, dtype=dtype)
        parent = Path(info["path"])
        results.append({"model": f"parent {dtype}", "parameters": info["parameters"], "bytes": info["bytes"],
                        "shape": asdict(shape)})
        for label, args in (("widen 2x hidden (net2net), verified", None),
                            ("block --after 1 (LLaMA Pro), verified", ["block", str(parent), "--after", "1"])):
            child = work / "children" / dtype / "child.onnx"
            child.parent.mkdir(parents=True, exist_ok=True)
            if args is None:
                m = _widen(runner, parent, child, shape, "--trials", "1", "--json")
            else:
                m = runner.cli(*args, "-o", str(child), "--trials", "1", "--json")
            entry = {"dtype": dtype, **_entry(label, m)}
            if m["returncode"] == 0:
                report = json.loads(m["stdout"])["verification"]
                entry.update(verified=report["passed"], computed_in=report.get("computed_in", ""),
                             method=report.get("method"), max_abs_error=report["outputs"][0]["max_abs_error"]
                             if report["outputs"] else None)
            results.append(entry)
            shutil.rmtree(child.parent, ignore_errors=True)
            if runner.before is not None:
                child.parent.mkdir(parents=True, exist_ok=True)
                if args is None:
                    old = _widen(runner, parent, child, shape, "--trials", "1", "-q", code=runner.before)
                else:
                    old = runner.cli(*args, "-o", str(child), "--trials", "1", "-q", code=runner.before)
                results.append({"dtype": dtype, "code": "before", **_entry(label, old)})
                shutil.rmtree(child.parent, ignore_errors=True)
        shutil.rmtree(parent.parent, ignore_errors=True)
    return results


def bench_regions(runner: Runner, work: Path, quick: bool) -> list[dict[str, Any]]:
    shape = _shape("regions", quick)
    info = _write(work, "regions", shape, dtype="float16")
    parent = Path(info["path"])
    # Eight identity blocks, spread as LLaMA Pro spreads them: after every fourth block, the last first
    # (so that the indices of the blocks still to come do not move).
    every = max(1, shape.layers // 8)
    after = [k for k in range(shape.layers - 1, -1, -1) if k % every == every - 1][:8]
    recipe = work / "blocks.json"
    recipe.write_text(json.dumps([{"morph": "block", "after": k} for k in after]))
    child = work / "children" / "regions" / "child.onnx"
    child.parent.mkdir(parents=True, exist_ok=True)
    # The quick model fits any budget: it is verified by regions because it is told to.
    grow = runner.cli("apply", str(parent), "--recipe", str(recipe), "-o", str(child), "--trials", "1", "--json",
                      *(["--verify-by", "regions"] if quick else []))
    entry = _entry(f"apply: {len(after)} x block (after {', '.join(map(str, after))}), verified", grow)
    entry.update(child_bytes=_files_bytes(child) if child.exists() else 0, goal_peak_bytes=GOAL_REGIONS_PEAK,
                 goal_met=grow["returncode"] == 0 and grow["peak_rss_bytes"] < GOAL_REGIONS_PEAK)
    if grow["returncode"] == 0:
        report = json.loads(grow["stdout"])["verification"]
        entry.update(verified=report["passed"], method=report["method"], regions=len(report["regions"]),
                     region_outputs=len(report["outputs"]), unchanged_nodes=report["unchanged_nodes"],
                     identical_weights=report["identical_weights"],
                     identical_weight_bytes=report["identical_weight_bytes"],
                     max_abs_error=max((o["max_abs_error"] for o in report["outputs"]), default=0.0))
    results = [{"model": "parent float16", "parameters": info["parameters"], "bytes": info["bytes"],
                "write_seconds": info["write_seconds"], "shape": asdict(shape)}, entry]
    if runner.before is not None:
        shutil.rmtree(child.parent, ignore_errors=True)
        child.parent.mkdir(parents=True, exist_ok=True)
        old = runner.cli("apply", str(parent), "--recipe", str(recipe), "-o", str(child), "--trials", "1", "-q",
                         code=runner.before)
        results.append({"code": "before", **_entry("apply: the same recipe, verified", old)})
    shutil.rmtree(work / "children", ignore_errors=True)
    return results


def bench_verify(runner: Runner, work: Path, quick: bool) -> list[dict[str, Any]]:
    """A ResNet-50 deepen verified whole and by regions (default trials), against two bare sessions."""
    scale, image = (0.125, 64) if quick else (1.0, 224)
    folder = work / "resnet50"
    folder.mkdir(parents=True, exist_ok=True)
    parent, child = folder / "resnet50.onnx", folder / "child.onnx"
    built = bench.measure([sys.executable, str(HERE / "bigmodels.py"), "resnet50", str(parent), "--scale", str(scale),
                           "--image", str(image)])
    if built["returncode"] != 0:
        raise RuntimeError(f"building ResNet-50 failed: {built['stderr'][-500:]}")
    layer = bench.bigmodels.MIDDLE_LAYER["resnet50"]
    deepen = runner.cli("deepen", str(parent), "--layer", layer, "-o", str(child), "--no-verify", "-q")
    if deepen["returncode"] != 0:
        raise RuntimeError(f"deepen failed: {deepen['stderr'][-500:]}")
    dims = f"1x3x{image}x{image}"
    sessions = runner.measure(_python(bench.FLOOR_SESSIONS) + [str(parent), str(child), dims])
    parameters = json.loads(built["stdout"])["parameters"]
    results = [{"model": "resnet50", "parameters": parameters, "child": f"deepen {layer}",
                **_entry("floor: two onnxruntime sessions run once (batch 1)", sessions)}]
    for method in ("outputs", "regions"):
        m = runner.cli("verify", str(parent), str(child), "--verify-by", method, "--json")
        entry = _entry(f"verify --verify-by {method} (3 trials, batch 2)", m)
        if m["returncode"] == 0:
            report = json.loads(m["stdout"])["verification"]
            entry.update(passed=report["passed"], regions=len(report["regions"]))
        results.append(entry)
    return results


_IMPORT_COST = """
import json, time
start = time.perf_counter()
import ml_dtypes  # noqa: F401
middle = time.perf_counter()
import onnx  # noqa: F401
end = time.perf_counter()
print(json.dumps({"ml_dtypes": middle - start, "onnx_after_ml_dtypes": end - middle}))
"""


def bench_cli(runner: Runner, work: Path, quick: bool) -> list[dict[str, Any]]:
    """`inspect` against the floor, with the modules' bytecode cached (as a pip install has it) and without.

    Without cached bytecode (a source checkout run with PYTHONDONTWRITEBYTECODE=1, as this machine
    sets it) Python compiles every onnxmorph module on every call, while onnx, numpy and onnxruntime
    come compiled with their wheels: that is measured too, apart.
    """
    model = bench.ROOT / "models" / "mlp_relu.onnx"
    repeat = 3 if quick else 9
    cached = {"PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    uncached = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": None}
    inspect = [sys.executable, "-m", "onnxmorph", "inspect", str(model)]
    commands: dict[str, tuple[list[str], dict[str, str | None], Path | None]] = {
        "floor": (_python("import onnx, onnxruntime"), cached, None),
        "import onnx": (_python("import onnx"), cached, None),
        "inspect": (inspect, cached, None),
        "inspect, no cached bytecode": (inspect, uncached, None),
    }
    # a model of checkpoint size in one file: inspect maps what it reads and no longer hashes the file
    big = Path(_write(work, "inspect", _shape("halves", quick), one_file=True)["path"])
    inspect_big = [sys.executable, "-m", "onnxmorph", "inspect", str(big)]
    commands[f"inspect of a {big.stat().st_size / 1e6:.0f} MB model in one file"] = (inspect_big, cached, None)
    if runner.before is not None:
        commands["inspect (before)"] = (inspect, cached, runner.before)
        commands["inspect (before), no cached bytecode"] = (inspect, uncached, runner.before)
        commands[f"inspect of a {big.stat().st_size / 1e6:.0f} MB model in one file (before)"] = (
            inspect_big, cached, runner.before)
    for cmd, env, code in commands.values():  # warm: bytecode written, files in the page cache
        runner.measure(cmd, code=code, env=env)
    times: dict[str, list[float]] = {k: [] for k in commands}
    cpu: dict[str, list[float]] = {k: [] for k in commands}  # user + system: what the machine's load adds nothing to
    peaks: dict[str, list[int]] = {k: [] for k in commands}
    for _ in range(repeat):  # interleaved: drift on a shared machine hits every command alike
        for key, (cmd, env, code) in commands.items():
            m = runner.measure(cmd, code=code, env=env)
            if m["returncode"] != 0:
                raise RuntimeError(f"{key} failed: {m['stderr'][-500:]}")
            times[key].append(m["seconds"])
            cpu[key].append(m["cpu_seconds"])
            peaks[key].append(m["peak_rss_bytes"])
    median = {k: statistics.median(v) for k, v in times.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    split = [json.loads(runner.measure(_python(_IMPORT_COST), env=cached)["stdout"]) for _ in range(repeat)]
    results = []
    for key in commands:
        entry = {"command": key, "median_seconds": round(median[key], 3),
                 "all_seconds": [round(t, 3) for t in times[key]], "median_cpu_seconds": round(median_cpu[key], 3),
                 "peak_rss_bytes": min(peaks[key])}
        if key != "floor":
            entry["vs_floor"] = bench._ratio(median[key], median["floor"])
            entry["cpu_vs_floor"] = bench._ratio(median_cpu[key], median_cpu["floor"])
        if key == "inspect":
            entry.update(goal=GOAL_CLI, goal_met=entry["vs_floor"] <= GOAL_CLI)
        results.append(entry)
    results.append({"measure": "import onnx: ml_dtypes (which onnx imports first) and the rest",
                    "ml_dtypes_seconds": round(statistics.median(s["ml_dtypes"] for s in split), 3),
                    "rest_of_onnx_seconds": round(statistics.median(s["onnx_after_ml_dtypes"] for s in split), 3)})
    return results


SECTIONS: dict[str, Callable[[Runner, Path, bool], list[dict[str, Any]]]] = {
    "cli": bench_cli, "verify": bench_verify, "halves": bench_halves, "onefile": bench_onefile,
    "growth": bench_growth, "regions": bench_regions,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="models of a few MB: a check that the script runs")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run these sections (repeatable)")
    parser.add_argument("--work", type=Path, help="folder for the models (default: a temporary one)")
    parser.add_argument("--out", type=Path, help=f"results JSON (default {DEFAULT_OUT.name}; --quick: {QUICK_OUT})")
    parser.add_argument("--before", type=Path, help="a checkout of older onnxmorph to measure beside this one")
    args = parser.parse_args(argv)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    work = Path(tempfile.mkdtemp(prefix="onnxmorph-memory-", dir=args.work))
    results: dict[str, Any] = {"machine": bench.machine(), "quick": args.quick, "sections": {}}
    runner = Runner(args.before)
    try:
        for name in args.only or list(SECTIONS):
            print(f"{name} ...", file=sys.stderr, flush=True)
            results["sections"][name] = SECTIONS[name](runner, work, args.quick)
            print(json.dumps(results["sections"][name], indent=1), flush=True)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and args.only:  # a section run replaces its own figures, keeping the others
        previous = json.loads(out.read_text())
        if previous.get("quick") == args.quick:
            results["sections"] = {**previous.get("sections", {}), **results["sections"]}
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
