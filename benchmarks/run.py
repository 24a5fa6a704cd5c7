"""Benchmarks of onnxmorph: morph and verification overhead against floors, solver speed, scaling.

    python benchmarks/run.py            # full run (VGG16- and ResNet-50-sized models), ~5-10 min
    python benchmarks/run.py --quick    # small models, under a minute

Every figure is a ratio to a floor measured in the same run (same machine, same moment), and
each subprocess measurement is its own process, so peak memory (the child's maximum resident
set, from wait4) belongs to that one command. Results go to benchmarks/out/results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "out" / "results.json"

# Goals of the benchmark issue, as ratios to the floors.
GOAL_MORPH_TIME = 1.3
GOAL_MORPH_MEMORY = 1.2
GOAL_VERIFY_TIME = 1.2
GOAL_SOLVER_SECONDS = 5.0
GOAL_SOLVER_RESIDUAL = 1e-6

# The floor: what any tool must do to rewrite an ONNX file.
FLOOR_LOAD_SAVE = """
import sys, onnx
model = onnx.load(sys.argv[1])
external = sys.argv[3] == "external"
onnx.save(model, sys.argv[2], save_as_external_data=external, all_tensors_to_one_file=True,
          location=(sys.argv[2].rsplit("/", 1)[-1] + ".data") if external else None)
"""

# The floor of verification: two onnxruntime sessions, each run once on the same input, created
# with the options onnxmorph uses (graph optimisations off), one after the other.
FLOOR_SESSIONS = """
import sys, numpy as np, onnxruntime as ort
shape = [int(d) for d in sys.argv[3].split("x")]
x = np.random.default_rng(0).uniform(-1, 1, size=shape).astype(np.float32)
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
options.log_severity_level = 3
outputs = []
for path in sys.argv[1:3]:
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    del session
assert outputs[0].shape == outputs[1].shape
"""


def _load_by_path(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


bigmodels = _load_by_path("onnxmorph_bench_bigmodels", HERE / "bigmodels.py")


# --------------------------------------------------------------------------- measuring


# Runs one command and reports its own wait4 rusage. It is a fresh, small process, so the
# command it forks starts from a small resident set; a command forked straight from a large
# parent (a test run, this script after building models) would count the parent's pages in
# its peak, since ru_maxrss includes what the child held between fork and exec.
_LAUNCHER = """
import json, os, subprocess, sys, time
report, cwd, cmd = sys.argv[1], sys.argv[2] or None, sys.argv[3:]
with open(os.devnull, "rb") as stdin:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=stdin)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
with open(report, "w") as f:
    json.dump({"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024,
               "cpu_seconds": usage.ru_utime + usage.ru_stime,
               "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


def measure(cmd: Sequence[str], *, cwd: Path | None = None, stdout_tail: int = 2000) -> dict[str, Any]:
    """Run `cmd` in a new process: wall seconds, peak resident memory (bytes), exit code, stderr tail.

    The peak comes from wait4's rusage of that one process, taken by a small launcher process,
    so neither earlier measurements nor this (possibly large) process leak into it.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Output goes to files, not pipes: reading pipes could block.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory(prefix="onnxmorph-bench-") as tmp:
        report = Path(tmp) / "report.json"
        launcher = [sys.executable, "-c", _LAUNCHER, str(report), str(cwd or ""), *cmd]
        subprocess.run(launcher, env=env, stdout=out, stderr=err, check=False)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        if report.is_file():
            result = json.loads(report.read_text())
        else:  # the launcher itself failed: report it as a failed run
            result = {"seconds": float("nan"), "peak_rss_bytes": 0, "returncode": -1}
    result["stderr"] = stderr.decode(errors="replace")[-2000:]
    result["stdout"] = stdout.decode(errors="replace")[-stdout_tail:]
    return result


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, with the smallest peak seen: noise only ever adds time and memory."""
    fastest = min(runs, key=lambda r: r["seconds"])
    out = dict(fastest)
    out["peak_rss_bytes"] = min(r["peak_rss_bytes"] for r in runs)
    out["runs"] = len(runs)
    out["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    return out


def interleaved(commands: dict[str, Sequence[str]], repeat: int, cwd: Path,
                cleanup: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Measure each command `repeat` times, interleaved (A B A B), so drift hits all alike."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in commands}
    for _ in range(repeat):
        for key, cmd in commands.items():
            result = measure(cmd, cwd=cwd)
            runs[key].append(result)
            if cleanup is not None:
                cleanup()
            if result["returncode"] != 0:
                break
    return {k: best_of(v) for k, v in runs.items()}


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


# --------------------------------------------------------------------------- models


def generate_big_models(work: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """Write the VGG16- and ResNet-50-sized models (and VGG16 with external data) into `work`."""
    models: dict[str, dict[str, Any]] = {}
    # --quick keeps the architectures but shrinks channels and images, so it runs in seconds.
    scale, image = (0.125, 64) if quick else (1.0, 224)
    for name in ("vgg16", "resnet50"):
        path = work / f"{name}.onnx"
        cmd = [sys.executable, str(HERE / "bigmodels.py"), name, str(path), "--scale", str(scale),
               "--image", str(image)]
        external = None
        if name == "vgg16":
            external = work / "ext" / f"{name}.onnx"
            external.parent.mkdir(exist_ok=True)
            cmd += ["--external-copy", str(external)]
        result = measure(cmd)
        if result["returncode"] != 0:
            raise RuntimeError(f"generating {name} failed: {result['stderr']}")
        info = json.loads(result["stdout"])
        info.update(path=str(path), layer=bigmodels.MIDDLE_LAYER[name], input_shape=[1, 3, image, image],
                    generate_seconds=round(result["seconds"], 2))
        models[name] = info
        if external is not None:
            models[f"{name}_external"] = dict(info, path=str(external), external_data=True)
    return models


# --------------------------------------------------------------------------- 1. morph overhead


def morph_commands(layer: str, params: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: ["--layer", layer, *args] for name, args in params.items()}


def pass_arguments(model: str, quick: bool) -> dict[str, list[str]]:
    """CLI arguments of each morph on the model's middle layer (widths relative to the layer)."""
    # Middle layers: VGG16 conv4_2 is 512 -> 512, ResNet-50 layer3_2_conv2 is 256 -> 256.
    base = {"vgg16": 512, "resnet50": 256}[model.split("_")[0]]
    if quick:
        base = max(1, round(base * 0.125))
    return {
        "widen": ["--width", str(base + base // 4)],
        "deepen": ["--kernel", "3"],
        "kernel": ["--size", "5"],
    }


def available_passes() -> list[str]:
    import onnxmorph

    return sorted(onnxmorph.REGISTRY)


def bench_morph(models: dict[str, dict[str, Any]], work: Path, repeat: int, quick: bool) -> list[dict[str, Any]]:
    """CLI morphs with --no-verify against onnx.load + onnx.save of the same file."""
    registered = available_passes()
    results = []
    out = work / "out"
    out.mkdir(exist_ok=True)

    def clean() -> None:
        for p in out.iterdir():
            p.unlink()

    for name, info in models.items():
        external = bool(info.get("external_data"))
        commands: dict[str, list[str]] = {
            "floor": [sys.executable, "-c", FLOOR_LOAD_SAVE, info["path"], str(out / "floor.onnx"),
                      "external" if external else "single"],
        }
        args = pass_arguments(name, quick)
        for pass_name in ("widen", "deepen", "kernel"):
            if pass_name not in registered:
                continue
            commands[pass_name] = [sys.executable, "-m", "onnxmorph", pass_name, info["path"],
                                   "--layer", info["layer"], *args[pass_name], "-o",
                                   str(out / f"{pass_name}.onnx"), "--no-verify", "-q"]
        measured = interleaved(commands, repeat, ROOT, clean)
        floor = measured["floor"]
        results.append({"model": name, "operation": "floor: onnx.load + onnx.save", **_public(floor)})
        for pass_name in ("widen", "deepen", "kernel"):
            if pass_name not in commands:
                results.append({"model": name, "operation": pass_name, "available": False,
                                "note": "pass not registered in this checkout"})
                continue
            m = measured[pass_name]
            entry = {"model": name, "operation": pass_name, "layer": info["layer"],
                     "args": args[pass_name], **_public(m),
                     "time_ratio": _ratio(m["seconds"], floor["seconds"]),
                     "memory_ratio": _ratio(m["peak_rss_bytes"], floor["peak_rss_bytes"])}
            entry["goal_met"] = (m["returncode"] == 0 and entry["time_ratio"] <= GOAL_MORPH_TIME
                                 and entry["memory_ratio"] <= GOAL_MORPH_MEMORY)
            results.append(entry)
    return results


def _public(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: m[k] for k in ("seconds", "peak_rss_bytes", "returncode", "runs", "all_seconds") if k in m}
    out["seconds"] = round(out["seconds"], 3)
    if m.get("returncode"):
        out["error"] = m["stderr"].strip().splitlines()[-1:] or [""]
    return out


# --------------------------------------------------------------------------- 2. verification


def bench_verify(models: dict[str, dict[str, Any]], work: Path, repeat: int, quick: bool) -> list[dict[str, Any]]:
    """`onnxmorph verify --trials 1` of parent and child against two bare onnxruntime sessions."""
    registered = available_passes()
    results = []
    for name in ("vgg16", "resnet50"):
        info = models[name]
        child = work / f"{name}_child.onnx"
        # A real child when a pass is there; otherwise the parent's own copy (same cost to verify).
        made = False
        for pass_name in ("widen", "kernel", "deepen"):
            if pass_name in registered:
                args = pass_arguments(name, quick)[pass_name]
                r = measure([sys.executable, "-m", "onnxmorph", pass_name, info["path"], "--layer", info["layer"],
                             *args, "-o", str(child), "--no-verify", "-q"], cwd=ROOT)
                made = r["returncode"] == 0
                if made:
                    break
        if not made:
            shutil.copyfile(info["path"], child)
            pass_name = "copy"
        # Batch 1 (onnxmorph's default for a dynamic N is 2): the runs cost the same in both commands,
        # and VGG16 at batch 2 takes ~10 s per run on 2 cores without graph optimisations.
        batch_shape = info["input_shape"]
        dims = "x".join(map(str, batch_shape))
        commands = {
            "floor": [sys.executable, "-c", FLOOR_SESSIONS, info["path"], str(child), dims],
            "verify": [sys.executable, "-m", "onnxmorph", "verify", info["path"], str(child), "--trials", "1",
                       "--shape", f"input:{dims}", "-q"],
        }
        measured = interleaved(commands, repeat, ROOT)
        floor, ver = measured["floor"], measured["verify"]
        entry = {"model": name, "child": pass_name, "input_shape": batch_shape,
                 "floor": _public(floor), "verify": _public(ver),
                 "time_ratio": _ratio(ver["seconds"], floor["seconds"]),
                 "memory_ratio": _ratio(ver["peak_rss_bytes"], floor["peak_rss_bytes"])}
        entry["goal_met"] = ver["returncode"] == 0 and entry["time_ratio"] <= GOAL_VERIFY_TIME
        results.append(entry)
        child.unlink(missing_ok=True)
    return results


# --------------------------------------------------------------------------- 3. solver


SOLVER_CASES = {
    # name: (parent filter shape, kernel of the new second layer)
    "conv512_3x3_kernel1": ((512, 512, 3, 3), (1, 1)),
    "conv512_3x3_kernel3": ((512, 512, 3, 3), (3, 3)),
    "gemm4096": ((4096, 4096), ()),
}
QUICK_SOLVER_CASES = {
    "conv64_3x3_kernel1": ((64, 64, 3, 3), (1, 1)),
    "conv64_3x3_kernel3": ((64, 64, 3, 3), (3, 3)),
    "gemm256": ((256, 256), ()),
}


def bench_solver(quick: bool, repeat: int) -> list[dict[str, Any]]:
    """NetMorph depth solutions at the parent's width: seconds and relative residual."""
    import numpy as np

    from onnxmorph.numerics.solvers import compose, solve_deepen, target_kernel

    results = []
    for name, (shape, k2) in (QUICK_SOLVER_CASES if quick else SOLVER_CASES).items():
        rng = np.random.default_rng(0)
        fan_in = int(np.prod(shape[1:]))
        g = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        times = []
        for r in range(repeat):
            start = time.perf_counter()
            solution = solve_deepen(g, k2, shape[0], np.random.default_rng(r))
            times.append(time.perf_counter() - start)
        # Independent check of the residual, in float64 and in the float32 the child stores.
        target = target_kernel(g.astype(np.float64), k2)
        exact = np.linalg.norm(compose(solution.f2, solution.f1) - target) / np.linalg.norm(target)
        f32 = compose(solution.f2.astype(np.float32).astype(np.float64),
                      solution.f1.astype(np.float32).astype(np.float64))
        stored = np.linalg.norm(f32 - target) / np.linalg.norm(target)
        entry = {"case": name, "filter": list(shape), "k2": list(k2), "width": shape[0],
                 "seconds": round(min(times), 3), "all_seconds": [round(t, 3) for t in times],
                 "algorithm": solution.algorithm, "iterations": solution.iterations,
                 "relative_residual": float(exact), "solver_reported_residual": float(solution.residual),
                 "relative_residual_float32_weights": float(stored)}
        entry["goal_met"] = bool(entry["seconds"] < GOAL_SOLVER_SECONDS and exact < GOAL_SOLVER_RESIDUAL)
        results.append(entry)
    return results


# --------------------------------------------------------------------------- 4. scaling


def bench_scaling(work: Path, quick: bool, repeat: int) -> list[dict[str, Any]]:
    """Morph time (load, morph, save; no verification) of cifar10_quick at growing widths."""
    import onnx

    import onnxmorph
    from onnxmorph.pipeline.run import VerifyOptions, run_passes

    generate = _load_by_path("onnxmorph_models_generate", ROOT / "models" / "generate.py")
    registered = available_passes()
    multipliers = (1, 2) if quick else (1, 2, 4, 8)
    results = []
    for k in multipliers:
        path = work / f"cifar10_quick_x{k}.onnx"
        model = generate.build_cifar10_quick(width_multiplier=k)
        onnx.save(model, str(path))
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        conv2 = 32 * k
        params = {"widen": {"width": conv2 + conv2 // 4}, "deepen": {"kernel": 3}, "kernel": {"size": 7}}
        entry: dict[str, Any] = {"width_multiplier": k, "weight_bytes": weight_bytes, "layer": "conv2"}
        for pass_name, kwargs in params.items():
            if pass_name not in registered:
                continue
            step_cls = onnxmorph.get_pass(pass_name)
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                outcome = run_passes(path, [step_cls(layer="conv2", **kwargs)], VerifyOptions(enabled=False))
                onnxmorph.save(outcome.child, work / "scaled_child.onnx")
                times.append(time.perf_counter() - start)
            entry[pass_name] = round(min(times), 4)
        results.append(entry)
    base = results[0]
    for entry in results[1:]:
        growth = entry["weight_bytes"] / base["weight_bytes"]
        entry["bytes_growth"] = round(growth, 2)
        for pass_name in ("widen", "deepen", "kernel"):
            if pass_name in entry:
                t_growth = entry[pass_name] / base[pass_name]
                entry[f"{pass_name}_time_growth"] = round(t_growth, 2)
                entry[f"{pass_name}_follows_bytes"] = bool(t_growth <= growth)
    return results


# --------------------------------------------------------------------------- report


def print_summary(results: dict[str, Any]) -> None:
    lines = [f"onnxmorph benchmarks ({'quick' if results['quick'] else 'full'} run, "
             f"{results['machine']['cpus']} CPUs, {results['total_seconds']:.0f} s)"]
    if results.get("models"):
        lines.append("models:")
        for name, info in results["models"].items():
            lines.append(f"  {name:18s} {info['parameters'] / 1e6:7.1f}M parameters, {_mb(info['file_bytes'])}"
                         + (" (external data)" if info.get("external_data") else ""))
    if results.get("morph"):
        lines.append(f"1. morph overhead, CLI --no-verify vs onnx.load + onnx.save "
                     f"(goal: time <= {GOAL_MORPH_TIME}x, memory <= {GOAL_MORPH_MEMORY}x):")
        for e in results["morph"]:
            if e.get("available") is False:
                lines.append(f"  {e['model']:18s} {e['operation']:8s} not available ({e['note']})")
            elif "time_ratio" not in e:
                lines.append(f"  {e['model']:18s} {'floor':8s} {e['seconds']:7.2f} s  {_mb(e['peak_rss_bytes']):>8s}")
            else:
                status = "ok" if e["goal_met"] else ("FAILED" if e["returncode"] else "missed")
                lines.append(f"  {e['model']:18s} {e['operation']:8s} {e['seconds']:7.2f} s  "
                             f"{_mb(e['peak_rss_bytes']):>8s}  time {e['time_ratio']:.2f}x  "
                             f"memory {e['memory_ratio']:.2f}x  {status}")
    if results.get("verify"):
        lines.append(f"2. verification, `verify --trials 1` vs two onnxruntime sessions run once "
                     f"(goal: time <= {GOAL_VERIFY_TIME}x):")
        for e in results["verify"]:
            lines.append(f"  {e['model']:18s} floor {e['floor']['seconds']:6.2f} s {_mb(e['floor']['peak_rss_bytes'])}"
                         f"  verify {e['verify']['seconds']:6.2f} s {_mb(e['verify']['peak_rss_bytes'])}"
                         f"  time {e['time_ratio']:.2f}x memory {e['memory_ratio']:.2f}x  "
                         f"{'ok' if e['goal_met'] else 'missed'}")
    if results.get("solver"):
        lines.append(f"3. solver, NetMorph depth solution at the parent's width "
                     f"(goal: < {GOAL_SOLVER_SECONDS} s, residual < {GOAL_SOLVER_RESIDUAL}):")
        for e in results["solver"]:
            lines.append(f"  {e['case']:22s} {e['seconds']:6.2f} s  residual {e['relative_residual']:.1e} "
                         f"(float32 weights {e['relative_residual_float32_weights']:.1e})  {e['algorithm']}  "
                         f"{'ok' if e['goal_met'] else 'missed'}")
    if results.get("scaling"):
        lines.append("4. scaling, cifar10_quick conv2 morphs in-process (load + morph + save), seconds:")
        for e in results["scaling"]:
            cells = [f"x{e['width_multiplier']}", f"{e['weight_bytes'] / 1e6:8.2f} MB of weights"]
            for p in ("widen", "deepen", "kernel"):
                if p in e:
                    growth = ""
                    if p + "_time_growth" in e:
                        growth = f" ({e[p + '_time_growth']}x vs bytes {e['bytes_growth']}x)"
                    cells.append(f"{p} {e[p]:.3f}{growth}")
            lines.append("  " + "  ".join(cells))
    print("\n".join(lines))


def machine() -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}


SECTIONS = ("morph", "verify", "solver", "scaling")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and one repetition (a smoke run)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    parser.add_argument("--repeat", type=int, help="repetitions of each measurement (best is kept; default 2, "
                                                   "1 with --quick)")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    parser.add_argument("--workdir", type=Path, help="where to write the generated models (default: a temp folder)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 2)
    sections = args.only or list(SECTIONS)
    start = time.perf_counter()
    results: dict[str, Any] = {"quick": args.quick, "repeat": repeat, "machine": machine(), "goals": {
        "morph_time_ratio": GOAL_MORPH_TIME, "morph_memory_ratio": GOAL_MORPH_MEMORY,
        "verify_time_ratio": GOAL_VERIFY_TIME, "solver_seconds": GOAL_SOLVER_SECONDS,
        "solver_relative_residual": GOAL_SOLVER_RESIDUAL}}
    tmp = None
    if args.workdir:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="onnxmorph-bench-")
        work = Path(tmp.name)
    try:
        if "morph" in sections or "verify" in sections:
            print("generating the large models ...", file=sys.stderr, flush=True)
            results["models"] = generate_big_models(work, args.quick)
        if "morph" in sections:
            print("1. morph overhead ...", file=sys.stderr, flush=True)
            results["morph"] = bench_morph(results["models"], work, repeat, args.quick)
        if "verify" in sections:
            print("2. verification overhead ...", file=sys.stderr, flush=True)
            results["verify"] = bench_verify(results["models"], work, repeat, args.quick)
        if "solver" in sections:
            print("3. solver speed ...", file=sys.stderr, flush=True)
            results["solver"] = bench_solver(args.quick, repeat)
        if "scaling" in sections:
            print("4. scaling ...", file=sys.stderr, flush=True)
            results["scaling"] = bench_scaling(work, args.quick, max(repeat, 3))
    finally:
        if tmp is not None:
            tmp.cleanup()
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
