"""Checks that the shipped reference models are valid, runnable, sane and match their generator."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
LAYER_OPS = {"Conv", "Gemm", "MatMul"}


def _load_generator() -> ModuleType:
    # models/ is deliberately not a package, so import the script by path.
    spec = importlib.util.spec_from_file_location("onnxmorph_models_generate",
                                                  MODELS_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()
STEMS = sorted(generate.MODELS)


def _path(stem: str) -> Path:
    return MODELS_DIR / f"{stem}.onnx"


def _run(model: onnx.ModelProto, batch: int, seed: int = 0) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in session.get_inputs():
        shape = [batch, *info.shape[1:]]
        feeds[info.name] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    return session.run(None, feeds)


def test_registry_lists_the_expected_models() -> None:
    assert set(generate.MODELS) == {
        "mlp_relu", "mlp_tanh", "cifar10_quick", "vgg_bn", "resnet_mini", "inception_mini",
        "mobilenet_mini", "transformer_ff", "transformer_prenorm",
    }


@pytest.mark.parametrize("stem", STEMS)
def test_file_is_valid_and_small(stem: str) -> None:
    path = _path(stem)
    assert path.is_file(), f"{path} missing: run python models/generate.py"
    assert path.stat().st_size < 1024 * 1024
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "onnxmorph-models"
    assert model.doc_string
    assert model.ir_version <= 8


@pytest.mark.parametrize("stem", STEMS)
def test_file_matches_generator_byte_for_byte(stem: str) -> None:
    # Guards against the committed binaries drifting from the script that documents them.
    assert generate.MODELS[stem]().SerializeToString() == _path(stem).read_bytes()


@pytest.mark.parametrize("stem", STEMS)
def test_builder_is_deterministic_and_seed_dependent(stem: str) -> None:
    builder = generate.MODELS[stem]
    assert builder(seed=3).SerializeToString() == builder(seed=3).SerializeToString()
    assert builder(seed=3).SerializeToString() != builder(seed=4).SerializeToString()


@pytest.mark.parametrize("stem", STEMS)
def test_batch_dim_is_dynamic_and_rest_static(stem: str) -> None:
    model = onnx.load(str(_path(stem)))
    for value in [*model.graph.input, *model.graph.output]:
        tensor_type = value.type.tensor_type
        assert tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = tensor_type.shape.dim
        assert dims[0].dim_param == "N", value.name
        assert all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[1:]), value.name


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("batch", [1, 3])
def test_runs_with_sane_outputs(stem: str, batch: int) -> None:
    outputs = _run(onnx.load(str(_path(stem))), batch)
    for out in outputs:
        assert out.shape[0] == batch
        assert np.all(np.isfinite(out))
        # Neither exploding nor vanishing: weights are scaled to keep activations O(1).
        assert 0.05 < float(np.std(out)) < 20.0
        assert float(np.max(np.abs(out))) < 100.0


@pytest.mark.parametrize("stem", STEMS)
def test_batch_rows_are_independent(stem: str) -> None:
    # The same sample must give the same answer alone or in a batch (catches batch-mixing ops).
    model = onnx.load(str(_path(stem)))
    batched = _run(model, 3, seed=7)
    single = _run(model, 1, seed=7)
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b[:1], s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stem", STEMS)
def test_layers_have_unique_names_distinct_from_tensors(stem: str) -> None:
    graph = onnx.load(str(_path(stem))).graph
    node_names = [n.name for n in graph.node]
    assert all(node_names), "every node is named"
    assert len(set(node_names)) == len(node_names)
    tensors = {t for n in graph.node for t in [*n.input, *n.output]}
    tensors |= {i.name for i in graph.input} | {i.name for i in graph.initializer}
    layers = [n for n in graph.node if n.op_type in LAYER_OPS]
    assert layers
    for node in layers:
        # A name shared with a tensor would make "--layer X" ambiguous.
        assert node.name not in tensors, node.name
        assert node.output[0] != node.name


@pytest.mark.parametrize("width", [0.5, 2])
@pytest.mark.parametrize("stem", STEMS)
def test_width_variants_build_and_run(stem: str, width: float) -> None:
    model = generate.MODELS[stem](width_multiplier=width)
    onnx.checker.check_model(model, full_check=True)
    for out in _run(model, 2):
        assert np.all(np.isfinite(out))
        assert 0.05 < float(np.std(out)) < 20.0


def test_width_multiplier_scales_cifar10_quick_channels() -> None:
    for width in (1, 2, 4):
        model = generate.build_cifar10_quick(width_multiplier=width)
        weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
        assert weights["conv1.weight"] == (32 * width, 3, 5, 5)
        assert weights["conv3.weight"] == (64 * width, 32 * width, 5, 5)
        assert weights["fc1.weight"] == (64 * width, 64 * width * 16)
        assert weights["fc2.weight"] == (10, 64 * width)


def test_transformers_use_opset_17_and_others_13() -> None:
    for stem in STEMS:
        model = onnx.load(str(_path(stem)))
        opset = {o.domain: o.version for o in model.opset_import}[""]
        assert opset == (17 if stem.startswith("transformer_") else 13), stem


def test_main_writes_identical_files(tmp_path: Path) -> None:
    generate.main(["--out", str(tmp_path)])
    for stem in STEMS:
        assert (tmp_path / f"{stem}.onnx").read_bytes() == _path(stem).read_bytes()
