"""Growing in bounded memory: one-file parents stream, solvers work in the weights' dtype a slab at a time,
16-bit models grow and verify, and a child larger than memory is verified region by region.

Memory is checked as peak-minus-baseline of one CLI process (VmHWM, as tests/test_streaming.py
does) on models of a few MB; the figures at checkpoint sizes are in benchmarks/memory.py.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from test_streaming import _measure  # one CLI command's peak memory above its interpreter's

import onnxmorph
from onnxmorph import cli
from onnxmorph.io import streaming
from onnxmorph.numerics import widening
from onnxmorph.verification.verifier import Verifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import llama  # noqa: E402  (the Llama-style model writer of the benchmarks)

sys.path.remove(str(ROOT / "benchmarks"))

WRITER = "/model/layers.0/self_attn/o_proj/MatMul"  # net2net on it tiles the whole residual stream
SMALL = llama.LlamaShape(hidden=256, layers=8, heads=4, intermediate=688, vocab=1000)  # 27 MB in float32

def _llama(folder: Path, shape: llama.LlamaShape = SMALL, **options: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(llama.write_llama(folder / "model.onnx", shape, **options)["path"])


def _files(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


# --------------------------------------------------------------------------- a one-file parent streams


def test_a_one_file_parent_grows_in_the_memory_of_an_external_data_one(tmp_path: Path) -> None:
    """2x hidden growth of every weight: a parent in one file costs what the same weights with external data cost."""
    one = _llama(tmp_path / "one", one_file=True)
    ext = _llama(tmp_path / "ext")
    args = ["--layer", WRITER, "--width", str(2 * SMALL.hidden), "--method", "net2net", "--no-verify", "-q"]
    extra_ext = _measure(tmp_path, "widen", str(ext), "-o", str(tmp_path / "c_ext.onnx"), *args)
    extra_one = _measure(tmp_path, "widen", str(one), "-o", str(tmp_path / "c_one.onnx"), *args)
    child = _files(tmp_path / "c_one.onnx")
    largest = 2 * SMALL.hidden * SMALL.vocab * 4  # the widened embedding (and LM head)
    assert child > 1.9 * one.stat().st_size
    # neither holds the child: a few of its weights at a time (before, the one-file case held ~4 copies of it)
    assert extra_one < 0.5 * child and extra_ext < 0.5 * child, (extra_one, extra_ext, child)
    assert extra_one < 1.2 * extra_ext + 4 * largest, (extra_one, extra_ext)
    assert onnxmorph.verify(one, tmp_path / "c_one.onnx", trials=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["c_ext.onnx", "c_ext.onnx.data",
                                                                        "c_one.onnx"]


def test_computed_weights_are_written_once_straight_to_the_childs_data_file(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    parent = _llama(tmp_path / "p")
    copied: list[str] = []
    original = streaming.copy_range

    def spy(src: int, dst: int, length: int, src_offset: int, dst_offset: int) -> None:
        copied.append(os.readlink(f"/proc/self/fd/{src}"))
        original(src, dst, length, src_offset, dst_offset)

    monkeypatch.setattr(streaming, "copy_range", spy)
    out = tmp_path / "child.onnx"
    assert cli.main(["widen", str(parent), "--layer", WRITER, "--width", str(2 * SMALL.hidden), "--method", "net2net",
                     "-o", str(out), "--trials", "1", "-q"]) == 0
    # only the parent's untouched weights were copied; the computed ones were renamed into place with their file
    assert copied and all(Path(p).name == "model.onnx.data" for p in copied), set(copied)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["child.onnx", "child.onnx.data"]
    assert onnxmorph.verify(parent, out, trials=1)


def test_a_lazily_read_parent_may_have_more_external_data_than_memory(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    parent = _llama(tmp_path / "p")
    monkeypatch.setenv("ONNXMORPH_MAX_MODEL_BYTES", str(_files(parent) // 2))
    with pytest.raises(onnxmorph.UnsafeModelError, match="ONNXMORPH_MAX_MODEL_BYTES"):
        onnxmorph.load(parent)  # read into memory: refused
    assert onnxmorph.load(parent, lazy=True).graph.node  # mapped where touched: fine
    out = tmp_path / "child.onnx"
    assert cli.main(["block", str(parent), "--after", "0", "-o", str(out), "--trials", "1", "-q"]) == 0
    receipt = onnxmorph.history(onnx.load(str(out), load_external_data=False))[-1]["verification"]
    assert receipt["passed"] and receipt["method"] == "regions"  # the parent is over the budget: by regions


# --------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_solvers_keep_the_weights_dtype_and_match_the_float64_solution(dtype: str) -> None:
    np_dtype = llama._numpy_dtype(dtype)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(24, 10)).astype(np_dtype)
    h = rng.normal(size=(7, 24)).astype(np.float32)
    inserts = [(24, 24)]
    sources = widening.replication_sources(24, inserts, np.random.default_rng(1))
    grown = widening.solve_widen_outgoing(w, 0, inserts, rng, method="net2net", sources=sources)
    copied = widening.solve_widen_incoming(h.astype(np_dtype), 1, inserts, rng, mode="copy", sources=sources)
    assert grown.dtype == np_dtype and copied.dtype == np_dtype
    exact = w.astype(np.float64) / 2  # tiling: every channel has one copy
    np.testing.assert_array_equal(grown[:24], exact.astype(np_dtype))  # halving is exact in any float type
    np.testing.assert_array_equal(grown[24:], exact[sources].astype(np_dtype))
    np.testing.assert_array_equal(copied[:, 24:], h.astype(np_dtype)[:, sources])
    # the function is kept: x @ h' @ w' == x @ h @ w, to the type's rounding
    x = rng.normal(size=(3, 7))
    before = x @ h.astype(np_dtype).astype(np.float64) @ w.astype(np.float64)
    after = x @ copied.astype(np.float64) @ grown.astype(np.float64)
    np.testing.assert_allclose(after, before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_a_solver_allocates_its_result_and_slabs_not_float64_copies_of_the_weight(axis: int) -> None:
    rows, cols = (4096, 2048) if axis == 0 else (2048, 4096)
    w = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)  # 32 MiB, two slabs' worth
    old = w.shape[axis]
    sources = widening.replication_sources(old, [(old, old)], np.random.default_rng(1))
    tracemalloc.start()
    try:
        grown = widening.solve_widen_outgoing(w, axis, [(old, old)], np.random.default_rng(2), method="net2net",
                                              sources=sources)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # before: float64 copies of the weight, the division, the gathered copies and two concatenations (~10x the
    # weight); now the result and at most two slabs of work arrays
    assert peak < grown.nbytes + 2 * widening.CHUNK_BYTES + 2**20, (peak, grown.nbytes)
    index = [slice(None)] * 2
    index[axis] = slice(0, old)
    np.testing.assert_array_equal(grown[tuple(index)] * 2, w)


def test_mapped_pages_are_released(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    size = 64 * 2**20
    with open(path, "wb") as f:
        f.truncate(size)
    tensor = streaming.reference("w", onnx.TensorProto.FLOAT, [size // 4], str(path), 0, size)

    def resident() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    array = streaming.map_array(tensor)
    before = resident()
    assert float(array[:: mmap.PAGESIZE // 4].sum()) == 0.0  # touch every page
    touched = resident()
    streaming.unmap_all()
    after = resident()
    assert touched - before > 0.8 * size and touched - after > 0.8 * size, (before, touched, after)
    assert float(array[-1]) == 0.0  # still readable: the pages come back from the file


# --------------------------------------------------------------------------- 16-bit models


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_models_grow_and_verify(dtype: str, tmp_path: Path) -> None:
    parent = _llama(tmp_path / "p", llama.PRESETS["tiny"], dtype=dtype)
    out = tmp_path / "wide.onnx"
    assert cli.main(["widen", str(parent), "--layer", WRITER, "--width", "128", "--method", "net2net", "-o", str(out),
                     "--trials", "2", "-q"]) == 0
    report = onnxmorph.verify(parent, out, trials=2)
    assert report and report.method == "outputs"
    # onnxruntime has float16 kernels for this graph; bfloat16 runs as float32 copies, and says so
    assert ("float32" in report.computed_in) == (dtype == "bfloat16")
    if dtype == "bfloat16":
        assert "computes in bfloat16" in str(report)
    child = onnx.load(str(out), load_external_data=False)
    types = {t.name: t.data_type for t in child.graph.initializer}
    assert types["model.embed_tokens.weight"] == llama.DTYPES[dtype]  # grown in its own type
    block = tmp_path / "block.onnx"
    assert cli.main(["block", str(parent), "--after", "0", "-o", str(block), "--trials", "1", "-q"]) == 0
    by_regions = onnxmorph.verify(parent, block, trials=1, method="regions")
    assert by_regions and by_regions.method == "regions"
    assert ("float32" in by_regions.computed_in) == (dtype == "bfloat16")


def test_a_wrong_bfloat16_child_fails_on_its_float32_copy(tmp_path: Path) -> None:
    parent = _llama(tmp_path / "p", llama.PRESETS["tiny"], dtype="bfloat16")
    out = tmp_path / "wide.onnx"
    assert cli.main(["widen", str(parent), "--layer", WRITER, "--width", "128", "--method", "net2net", "-o", str(out),
                     "--no-verify", "-q"]) == 0
    _corrupt(out, "lm_head.weight")
    report = onnxmorph.verify(parent, out, trials=1)
    assert not report and report.computed_in


# --------------------------------------------------------------------------- verification by regions


def _corrupt(model: Path, name: str, value: float = 0.5) -> None:
    """Add `value` to the first element of weight `name` in the model's data file (in place)."""
    header = onnx.load(str(model), load_external_data=False)
    tensor = next(t for t in header.graph.initializer if t.name == name)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = llama._numpy_dtype({1: "float32", 10: "float16", 16: "bfloat16"}[tensor.data_type])
    with open(model.parent / info["location"], "r+b") as f:
        f.seek(int(info["offset"]))
        first = np.frombuffer(f.read(dtype.itemsize), dtype=dtype).astype(np.float32)
        f.seek(int(info["offset"]))
        f.write((first + value).astype(dtype).tobytes())


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("regions")
    parent = _llama(folder / "p", dtype="float16")
    child = folder / "child.onnx"
    recipe = folder / "blocks.json"
    recipe.write_text(json.dumps([{"morph": "block", "after": 2}, {"morph": "block", "after": 0}]))
    assert cli.main(["apply", str(parent), "--recipe", str(recipe), "-o", str(child), "--no-verify", "-q"]) == 0
    return parent, child


def test_a_child_verifies_by_regions_and_says_what_was_checked(blocked: tuple[Path, Path]) -> None:
    parent, child = blocked
    report = onnxmorph.verify(parent, child, trials=2, method="regions")
    assert report and report.method == "regions"
    assert len(report.regions) == 2  # one per inserted block, with the readers of its output
    header = onnx.load(str(parent), load_external_data=False)
    assert report.identical_weights == len(header.graph.initializer)  # every parent weight, byte for byte
    assert report.unchanged_nodes >= len(header.graph.node) - 4
    assert all(o.name.startswith("region ") for o in report.outputs)
    assert "not run whole" in str(report) and "2 changed region(s)" in str(report)
    # the same verdict as running the two models whole
    assert onnxmorph.verify(parent, child, trials=2, method="outputs")


def test_auto_verifies_by_regions_when_a_model_is_over_the_budget(blocked: tuple[Path, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    parent, child = blocked
    assert onnxmorph.verify(parent, child, trials=1).method == "outputs"
    monkeypatch.setenv("ONNXMORPH_MAX_MODEL_BYTES", str(_files(parent) // 2))
    assert onnxmorph.verify(parent, child, trials=1).method == "regions"


@pytest.mark.parametrize("what", ["untouched weight", "new block", "attribute"])
def test_a_wrong_child_fails_by_regions(what: str, blocked: tuple[Path, Path], tmp_path: Path) -> None:
    parent, child = blocked
    copy = tmp_path / "child.onnx"
    copy.write_bytes(child.read_bytes())
    (tmp_path / "child.onnx.data").write_bytes((child.parent / "child.onnx.data").read_bytes())
    header = onnx.load(str(copy), load_external_data=False)
    if what == "untouched weight":
        _corrupt(copy, "model/layers.1/mlp/up_proj.weight")
    elif what == "new block":  # the new block's writer is no longer zero: it is not the identity
        name = next(t.name for t in header.graph.initializer if "morph_block" in t.name and "o_proj" in t.name)
        _corrupt(copy, name, 1.0)
    else:
        node = next(n for n in header.graph.node if n.op_type == "Softmax" and "morph_block" not in n.name)
        node.attribute[0].i = 2  # softmax over the heads' other axis
        copy.write_bytes(header.SerializeToString())
    report = onnxmorph.verify(parent, copy, trials=1, method="regions")
    assert not report, str(report)
    assert report.method == "regions"
    if what != "new block":  # the changed part became a region of its own
        assert len(report.regions) == 3


def test_an_unchanged_child_verifies_by_regions_without_running_anything(tmp_path: Path) -> None:
    parent = _llama(tmp_path / "p", llama.PRESETS["tiny"])
    report = Verifier(parent, trials=1, method="regions").check(parent)
    assert report and not report.regions and not report.outputs


# --------------------------------------------------------------------------- the command line


def test_inspect_loads_neither_onnxruntime_nor_the_verifier(tmp_path: Path) -> None:
    code = ("import sys; from onnxmorph import cli; cli.main(['inspect', sys.argv[1]]); "
            "print(sorted(m for m in sys.modules if m.startswith(('onnxruntime', 'onnxmorph.verification.verifier', "
            "'onnxmorph.pipeline.run', 'torch', 'onnxmorph.search.loop'))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "models" / "mlp_relu.onnx")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
