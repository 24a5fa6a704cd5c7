"""Shared fixtures: the shipped reference models and the onnx wheel's real-architecture models."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import onnxmorph

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
LIGHT = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"

REFERENCE_MODELS = sorted(p.stem for p in MODELS.glob("*.onnx"))
LIGHT_MODELS = sorted(p.stem for p in LIGHT.glob("light_*.onnx"))

# Full sweeps over every layer of the big real-architecture models take far longer than CI
# allows; CI runs a seeded sample, `ONNXMORPH_FULL_SWEEP=1` runs them all.
FULL_SWEEP = os.environ.get("ONNXMORPH_FULL_SWEEP") == "1"

# Real architectures with hundreds of MB of fully connected weights (seconds to load and to run): left out of
# the default run, run by `-m slow`. The others cover the same patterns (chains, branches, concats, groups).
HEAVY_LIGHT = ("light_bvlc_alexnet", "light_vgg19", "light_zfnet512")


def light_stems(stems: list[str] | None = None, slow: tuple[str, ...] = ()) -> list[Any]:
    """`stems` (default: every light model) as parameters, the heavy ones and those in `slow` marked slow."""
    return [pytest.param(s, marks=pytest.mark.slow) if s in HEAVY_LIGHT or s in slow else s
            for s in (stems or LIGHT_MODELS)]


def sample_layers(names: list[str], count: int, seed: int = 0) -> list[str]:
    """All of `names` in a full sweep, else a seeded sample of `count` (first and last included from 2)."""
    if FULL_SWEEP or len(names) <= count:
        return list(names)
    rng = np.random.default_rng(seed)
    if count < 2:
        return [names[int(rng.integers(len(names)))]] if count == 1 else []
    middle = rng.choice(len(names) - 2, size=count - 2, replace=False) + 1
    picked = sorted({0, len(names) - 1, *middle.tolist()})
    return [names[k] for k in picked]


@functools.cache
def _reference(stem: str) -> onnx.ModelProto:
    return onnxmorph.load(MODELS / f"{stem}.onnx", normalize_model=True)


def parsed_model(text: str, floats: dict[str, np.ndarray], ints: dict[str, object] | None = None) -> onnx.ModelProto:
    """A model from ONNX text with float32 and int64 initializers, each node named by its first output, normalised."""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in floats.items())
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in (ints or {}).items())
    for node in model.graph.node:
        node.name = node.name or node.output[0]
    return onnxmorph.normalize(model)


def text_model(body: str, floats: dict[str, np.ndarray], ints: dict[str, object] | None = None, *, x: str, y: str,
               opset: int = 13) -> onnx.ModelProto:
    """`parsed_model` of a graph `g (x) => (y)` whose nodes are `body`."""
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g ({x} x) => ({y} y) {{
    {body}
    }}"""
    return parsed_model(text, floats, ints)


def described(step: onnxmorph.MorphPass, model: onnx.ModelProto) -> dict:
    """What inspect shows for `step` on `model`: its plan, described."""
    return step.describe(step.requires(model))


def reference_model(stem: str) -> onnx.ModelProto:
    """A shipped reference model, loaded and normalised (shared: do not mutate)."""
    return _reference(stem)


@functools.lru_cache(maxsize=2)
def _light(stem: str, seed: int) -> onnx.ModelProto:
    model = randomize_weights(onnxmorph.load(LIGHT / f"{stem}.onnx", normalize_model=True), seed)
    # A saturated (ResNet-50) or flat (Inception) softmax squashes differences; compare logits.
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Softmax" and node.output[0] in outputs:
            node.op_type = "Identity"
            del node.attribute[:]
    return model


def light_model(stem: str, seed: int = 0) -> onnx.ModelProto:
    """A real-architecture model from the onnx wheel with random, well-scaled weights.

    The shipped weights are ConstantOfShape fills (every element 0.02), which would hide
    any error that permutes or mixes channels; random weights expose them. The final Softmax
    becomes an Identity so that the compared outputs are logits.
    """
    return _light(stem, seed)


def randomize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` whose float initializers are random with trainer-like scales."""
    rng = np.random.default_rng(seed)
    roles: dict[str, str] = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for k, name in enumerate(node.input):
            if node.op_type in ("Conv", "ConvTranspose") and k == 1:
                roles[name] = "weight"
            elif node.op_type == "Gemm" and k == 1:
                roles[name] = "weight_t" if attrs.get("transB", 0) else "weight_n"
            elif node.op_type == "MatMul" and k == 1:
                roles[name] = "weight_n"
            elif node.op_type == "BatchNormalization" and k in (1, 4):
                roles[name] = "positive"
            elif node.op_type == "Mul" and k == 1:
                roles[name] = "positive"
            elif k >= 1 and node.op_type in ("Conv", "Gemm", "BatchNormalization", "Add", "Sum"):
                roles.setdefault(name, "shift")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        role = roles.get(tensor.name)
        if role is None or tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            continue
        shape = tuple(tensor.dims)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        if role == "weight":
            n = int(np.prod(shape[1:])) or 1
            array = rng.normal(0.0, np.sqrt(2.0 / n), size=shape)
        elif role in ("weight_t", "weight_n"):
            n = shape[1] if role == "weight_t" else shape[0]
            array = rng.normal(0.0, np.sqrt(2.0 / max(n, 1)), size=shape)
        elif role == "positive":
            array = rng.uniform(0.25, 0.75, size=shape)
        else:
            array = rng.normal(0.0, 0.1, size=shape)
        tensor.CopyFrom(numpy_helper.from_array(array.astype(dtype), tensor.name))
    return out


@pytest.fixture(params=REFERENCE_MODELS)
def reference_stem(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tmp_out(tmp_path: Path) -> Path:
    return tmp_path / "child.onnx"
