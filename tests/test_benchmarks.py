"""Smoke tests of the benchmark script's machinery (a --quick run), so that it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _module("onnxmorph_bench_run", RUN)


def test_measure_reports_the_peak_memory_of_that_one_process(bench) -> None:
    # 200 MB touched by one child must show in its own peak, and not in the next child's.
    big = bench.measure([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    small = bench.measure([sys.executable, "-c", "pass"])
    assert big["returncode"] == 0 and small["returncode"] == 0
    assert big["peak_rss_bytes"] >= 200 * 2**20
    assert small["peak_rss_bytes"] < 100 * 2**20
    assert big["seconds"] > 0
    failed = bench.measure([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    assert failed["returncode"] == 3 and "boom" in failed["stderr"]


def test_big_model_builders_have_the_real_parameter_counts() -> None:
    big = _module("onnxmorph_bench_bigmodels", ROOT / "benchmarks" / "bigmodels.py")
    # Shapes only: the counts are computed from dims, at a tiny scale, then from the formula at scale 1.
    vgg = big.build_vgg16(scale=1 / 16, image=32)
    onnx.checker.check_model(vgg)
    assert any(n.name == big.MIDDLE_LAYER["vgg16"] for n in vgg.graph.node)
    resnet = big.build_resnet50(scale=1 / 16, image=32)
    onnx.checker.check_model(resnet)
    assert any(n.name == big.MIDDLE_LAYER["resnet50"] for n in resnet.graph.node)
    assert sum(n.op_type == "Conv" for n in vgg.graph.node) == 13
    assert sum(n.op_type == "Conv" for n in resnet.graph.node) == 53


@pytest.mark.slow  # 25 s; the memory, streaming and grow benchmarks' quick runs stay in the default run
def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "-o", str(out), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert set(results["models"]) == {"vgg16", "vgg16_external", "resnet50"}
    floors = [e for e in results["morph"] if e["operation"].startswith("floor")]
    assert len(floors) == 3 and all(e["returncode"] == 0 and e["peak_rss_bytes"] > 0 for e in floors)
    morphs = [e for e in results["morph"] if "time_ratio" in e]
    # Whatever passes are registered, each one ran and succeeded on every model.
    assert all(e["returncode"] == 0 for e in morphs), [e.get("error") for e in morphs]
    assert len(results["verify"]) == 2
    assert all(e["verify"]["returncode"] == 0 and e["floor"]["returncode"] == 0 for e in results["verify"])
    assert len(results["solver"]) == 3
    assert all(e["relative_residual"] < 1e-6 for e in results["solver"])
    assert [e["width_multiplier"] for e in results["scaling"]] == [1, 2]
    assert "1. morph overhead" in proc.stdout and "3. solver" in proc.stdout


# --------------------------------------------------------------------------- the core fixes the benchmarks led to


def _big_gemm_model(n: int = 256) -> onnx.ModelProto:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_approx_size_matches_the_serialised_size_and_skeleton_keeps_no_weight_data() -> None:
    from onnxmorph.io import loading as mio

    model = _big_gemm_model()
    exact = model.ByteSize()
    assert abs(mio.approx_size(model) - exact) <= 16
    bare = mio.skeleton(model, keep_dims=False)
    assert bare.ByteSize() < 1024 and list(bare.graph.initializer[0].dims) == [0]
    assert list(mio.skeleton(model).graph.initializer[0].dims) == [256, 256]
    onnx.checker.check_model(bare)
    assert model.ByteSize() == exact  # the model itself is untouched


def test_structural_check_still_refuses_a_broken_graph_with_large_weights() -> None:
    from onnxmorph.errors import InvalidModelError
    from onnxmorph.io import loading as mio

    model = _big_gemm_model()
    mio.check_structure(model)
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(InvalidModelError, match="nowhere"):
        mio.check_structure(model)


def test_save_writes_no_load_time_metadata_and_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    import onnxmorph
    from onnxmorph.io import loading as mio

    source = tmp_path / "m.onnx"
    onnx.save(_big_gemm_model(), str(source))
    model = onnxmorph.load(source)
    before = model.SerializeToString()
    assert any(p.key == "onnxmorph.source_sha256" for p in model.metadata_props)
    mio.save(model, tmp_path / "out.onnx")
    assert model.SerializeToString() == before
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert not any(p.key.startswith("onnxmorph.source") for p in written.metadata_props)
    assert written.graph.initializer[0].raw_data == model.graph.initializer[0].raw_data
