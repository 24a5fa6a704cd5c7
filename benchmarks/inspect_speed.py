"""How long `inspect` takes on real architectures, as a ratio to loading the same model.

    python benchmarks/inspect_speed.py            # DenseNet-121, ResNet-50, Inception v2 from the onnx wheel
    python benchmarks/inspect_speed.py --repeat 5

`inspect` asks every morph about every layer. Before the pass contract handed plans over, the
graph view and the shapes were cached globally and looked up by a size that copied the graph
each time: DenseNet-121 took 11-18 s. Each figure is the median of `--repeat` runs, measured in
this process one after the other; the ratio is to `onnxmorph.load` of the same file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import onnx

import onnxmorph

LIGHT = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"
MODELS = ("light_densenet121", "light_resnet50", "light_inception_v2")


def _median_seconds(run, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="onnxmorph-inspect-"))
    for stem in MODELS:
        # as an exporter writes it: weights as initializers (the wheel's models make them with
        # ConstantOfShape, which loading folds at a cost of its own)
        path = scratch / f"{stem}.onnx"
        onnx.save(onnxmorph.load(LIGHT / f"{stem}.onnx", normalize_model=True), path)
        load = _median_seconds(lambda p=path: onnxmorph.load(p), args.repeat)
        model = onnxmorph.load(path)
        inspect = _median_seconds(lambda m=model: onnxmorph.inspect(m), args.repeat)
        layers = len(onnxmorph.inspect(model)["layers"])
        results.append({"model": stem, "layers": layers, "load_s": round(load, 3), "inspect_s": round(inspect, 3),
                        "inspect_vs_load": round(inspect / load, 1)})
        print(f"{stem:22s} {layers:4d} layers  load {load:6.3f} s  inspect {inspect:6.3f} s  "
              f"({inspect / load:5.1f}x load)")
    shutil.rmtree(scratch)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
