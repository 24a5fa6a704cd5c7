"""onnxmorph.train on exported language models: the ops a GPT needs, exact against onnxruntime; annealing of a."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import onnxmorph  # noqa: E402
from onnxmorph import train as ot  # noqa: E402
from onnxmorph.errors import UsageError  # noqa: E402
from onnxmorph.experiments import lm  # noqa: E402
from onnxmorph.graph.build import P_ACTIVATION_SUFFIX  # noqa: E402

torch.set_num_threads(1)

TINY = lm.GPTConfig(layers=2, width=32, heads=4, context=16)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch(net: ot.OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = net(*[torch.from_numpy(feeds[name]) for name in net.input_names])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _tokens(batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    return {"tokens": np.random.default_rng(seed).integers(0, lm.VOCAB, (batch, length)).astype(np.int64)}


def _trained_gpt(seed: int = 0) -> lm.GPT:
    # A few steps move LayerNorm's scales and biases off 1 and 0, so the comparison sees them.
    model = lm.GPT(TINY, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = torch.from_numpy(_tokens(8, TINY.context, seed + 1)["tokens"])
    for _ in range(3):
        optimizer.zero_grad()
        lm.lm_loss(model(tokens), tokens).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("opset", [17, 14])  # fused LayerNormalization; decomposed (ReduceMean, Sub, Pow, Sqrt, Div)
def test_exported_gpt_runs_in_torch_as_in_onnxruntime(opset: int) -> None:
    model = _trained_gpt()
    exported = lm.export(model, opset=opset)
    ops = {n.op_type for n in exported.graph.node}
    assert {"Gather", "Softmax", "Where", "Trilu", "Range", "Shape"} <= ops
    assert ("LayerNormalization" in ops) == (opset >= 17)
    net = ot.to_torch(exported)
    for batch, length in ((2, TINY.context), (3, 5), (1, 1)):  # the sequence axis is dynamic
        feeds = _tokens(batch, length, batch)
        np.testing.assert_allclose(_torch(net, feeds)[0], _ort(exported, feeds)[0], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(model(torch.from_numpy(feeds["tokens"])).numpy(), _ort(exported, feeds)[0],
                                       rtol=1e-4, atol=1e-5)
    # Every weight of the torch model is trainable in the module; the exporter's scalars are not.
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters())
    frozen = [name for name, p in net.onnx_parameters().items() if not p.requires_grad]
    assert all(net.parameter(name).numel() == 1 for name in frozen)


def test_trained_gpt_exports_back_exactly() -> None:
    exported = lm.export(lm.GPT(TINY, 1))
    net = ot.to_torch(exported)
    x = torch.from_numpy(_tokens(16, TINY.context, 4)["tokens"])
    losses = ot.fit(net, x[:, :-1], x[:, 1:], loss=lm.lm_loss, steps=4, batch_size=8,
                    optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    assert losses[-1] < losses[0]
    trained = ot.to_onnx(net)
    # The graph is the exported one, node for node, with the trained values.
    assert trained.graph.node == exported.graph.node
    assert [i.name for i in trained.graph.initializer] == [i.name for i in exported.graph.initializer]
    feeds = _tokens(2, 9, 5)
    np.testing.assert_allclose(_ort(trained, feeds)[0], _torch(net, feeds)[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(_ort(trained, feeds)[0], _ort(exported, feeds)[0], atol=1e-3)


@pytest.mark.slow
def test_dynamo_exported_gpt_runs_in_torch_as_in_onnxruntime() -> None:
    model = _trained_gpt(2)
    tokens = torch.zeros(2, 8, dtype=torch.int64)
    length = torch.export.Dim("length", max=TINY.context)
    program = torch.onnx.export(model, (tokens,), input_names=["tokens"], dynamo=True,
                                dynamic_shapes=({1: length},))
    exported = program.model_proto
    net = ot.to_torch(exported)
    for length in (8, 3):
        feeds = {exported.graph.input[0].name: _tokens(2, length, length)["tokens"]}
        np.testing.assert_allclose(_torch(net, feeds)[0], _ort(exported, feeds)[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- single ops against onnxruntime


def _single(op: str, inputs: list[np.ndarray], outputs: int = 1, opset: int = 17, constants: int = 0,
            **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model; the first `len(inputs) - constants` arrays are graph inputs, the rest initializers."""
    names = [f"in{k}" for k in range(len(inputs))]
    feeds_count = len(inputs) - constants
    graph = helper.make_graph(
        [helper.make_node(op, names, [f"out{k}" for k in range(outputs)], name="node", **attrs)], "single",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in zip(names[:feeds_count], inputs)],
        [helper.make_tensor_value_info(f"out{k}", _output_type(op, inputs, attrs), None) for k in range(outputs)],
        [numpy_helper.from_array(a, n) for n, a in zip(names[feeds_count:], inputs[feeds_count:])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return model, dict(zip(names[:feeds_count], inputs[:feeds_count]))


def _output_type(op: str, inputs: list[np.ndarray], attrs: dict) -> int:
    if op in ("Shape", "Size"):
        return TensorProto.INT64
    if op == "Cast":
        return attrs["to"]
    if op == "Not":
        return TensorProto.BOOL
    if op == "ConstantOfShape":
        return attrs["value"].data_type
    return helper.np_dtype_to_tensor_dtype(inputs[1 if op == "Where" else 0].dtype)


_F = np.random.default_rng(0).uniform(-1, 1, (3, 4, 5)).astype(np.float32)
_I = np.array([[-7, 7, 9], [-9, 4, 0]], np.int64)
CASES = {
    "Gather negative and 2-D indices": ("Gather", [_F, np.array([[-1, 0], [2, 1]], np.int64)], 1, 17, 1,
                                        {"axis": 1}),
    "Gather scalar index": ("Gather", [_F, np.array(-2, np.int64)], 1, 17, 1, {"axis": 2}),
    "integer Div truncates": ("Div", [_I, np.array([2, -2, 4], np.int64)], 1, 17, 0, {}),
    "Slice, negative step": ("Slice", [_F, np.array([-1, 4], np.int64), np.array([-9_000_000_000, 0], np.int64),
                                       np.array([0, 2], np.int64), np.array([-2, -3], np.int64)], 1, 17, 4, {}),
    "Slice, step 2": ("Slice", [_F, np.array([0], np.int64), np.array([4], np.int64), np.array([1], np.int64),
                                np.array([2], np.int64)], 1, 17, 4, {}),
    "Slice, clamped ends": ("Slice", [_F, np.array([1, -3], np.int64), np.array([9_000_000_000, -1], np.int64),
                                      np.array([0, 2], np.int64)], 1, 17, 3, {}),
    "Split by sizes": ("Split", [_F, np.array([1, 3], np.int64)], 2, 17, 1, {"axis": 1}),
    "Split, num_outputs": ("Split", [_F], 2, 18, 0, {"axis": 2, "num_outputs": 2}),
    "Expand both ways": ("Expand", [_F[:, :1, :], np.array([2, 1, 1, 1], np.int64)], 1, 17, 1, {}),
    "Trilu lower, k=1": ("Trilu", [_F, np.array(1, np.int64)], 1, 17, 1, {"upper": 0}),
    "Trilu upper": ("Trilu", [_F], 1, 17, 0, {}),
    "Range": ("Range", [np.array(2, np.int64), np.array(11, np.int64), np.array(3, np.int64)], 1, 17, 3, {}),
    "ConstantOfShape": ("ConstantOfShape", [np.array([2, 3], np.int64)], 1, 17, 1,
                        {"value": numpy_helper.from_array(np.array([-np.inf], np.float32))}),
    "Where": ("Where", [_F > 0, _F, np.array(-np.inf, np.float32)], 1, 17, 1, {}),
    "Shape with start": ("Shape", [_F], 1, 17, 0, {"start": 1}),
    "Cast to int": ("Cast", [_F * 10], 1, 17, 0, {"to": TensorProto.INT64}),
    "ReduceMax, input axes": ("ReduceMax", [_F, np.array([-1], np.int64)], 1, 18, 1, {"keepdims": 0}),
    "Max of three": ("Max", [_F, _F[:1] * 0.5, np.array(0.1, np.float32)], 1, 17, 0, {}),
    "Equal and Not": ("Not", [_I == 0], 1, 17, 0, {}),
    "Tile": ("Tile", [_F, np.array([1, 2, 1], np.int64)], 1, 17, 1, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_op_matches_onnxruntime(case: str) -> None:
    op, inputs, outputs, opset, constants, attrs = CASES[case]
    model, feeds = _single(op, inputs, outputs, opset, constants, **attrs)
    expected = _ort(model, feeds)
    got = _torch(ot.to_torch(model), feeds) if feeds else _torch_no_inputs(model)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, case
        np.testing.assert_array_equal(g, e)


def _torch_no_inputs(model: onnx.ModelProto) -> list[np.ndarray]:
    with torch.no_grad():
        out = ot.to_torch(model)()
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


# --------------------------------------------------------------------------- P-activations


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Tanh", ["h"], ["t"], name="act"),
             helper.make_node("Gemm", ["t", "w2", "b2"], ["y"], name="fc2", transB=1)]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n)
             for n, s in (("w1", (6, 8)), ("b1", (6,)), ("w2", (3, 6)), ("b2", (3,)))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_p_activation_constants_are_frozen_and_a_is_trainable() -> None:
    child = onnxmorph.deepen(_mlp(), layer="fc1", activation="tanh", seed=0)
    net = ot.to_torch(child)
    params = net.onnx_parameters()
    alphas = ot.activation_parameters(net)
    assert alphas and all(p.requires_grad for p in alphas.values())
    scalars = [name for name, p in params.items() if p.numel() == 1 and name not in alphas]
    assert scalars, "the P-tanh has its 1 of 1 - a"
    assert not any(params[name].requires_grad for name in scalars)
    ot.fit(net, np.random.default_rng(0).uniform(-1, 1, (32, 8)).astype(np.float32), np.arange(32) % 3,
           steps=3, batch_size=16, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    originals = {t.name: numpy_helper.to_array(t) for t in child.graph.initializer}
    assert all(params[name].item() == originals[name].item() for name in scalars)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_annealing_pulls_a_to_zero_along_a_linear_bound(activation: str) -> None:
    child = onnxmorph.deepen(_mlp(), layer="fc1", activation=activation, seed=0)
    net = ot.to_torch(child)
    alphas = list(ot.activation_parameters(net).values())
    assert all(torch.all(a == 1) for a in alphas)
    bounds: list[float] = []
    ot.fit(net, np.random.default_rng(0).uniform(-1, 1, (64, 8)).astype(np.float32), np.arange(64) % 3,
           steps=30, batch_size=16, optimizer=lambda p: torch.optim.Adam(p, lr=0.05), anneal_activations=20,
           callback=lambda step, loss: bounds.append(max(float(a.abs().max()) for a in alphas)))
    for step, bound in enumerate(bounds, 1):
        assert bound <= max(0.0, 1 - step / 20) + 1e-7, (step, bound)
    assert all(torch.all(a == 0) for a in alphas)
    assert bounds[4] > 0  # a is held under the bound, not set to 0 at once
    # With a = 0 the new layer is the plain non-linearity, and the export is still exact.
    exported = ot.to_onnx(net)
    a_values = [numpy_helper.to_array(t) for t in exported.graph.initializer
                if t.name.endswith(P_ACTIVATION_SUFFIX) or t.name in ot.activation_parameters(net)]
    assert a_values and all(np.all(v == 0) for v in a_values)
    feeds = {"x": np.random.default_rng(3).uniform(-1, 1, (5, 8)).astype(np.float32)}
    np.testing.assert_allclose(_ort(exported, feeds)[0], _torch(net, feeds)[0], rtol=1e-4, atol=1e-5)


def test_annealing_needs_p_activations_and_lr_schedule_scales_the_rate() -> None:
    net = ot.to_torch(_mlp())
    x, y = np.zeros((8, 8), np.float32), np.zeros(8, np.int64)
    with pytest.raises(UsageError, match="P-activations"):
        ot.fit(net, x, y, steps=1, anneal_activations=5)
    before = {n: p.detach().clone() for n, p in net.onnx_parameters().items()}
    ot.fit(net, np.ones((8, 8), np.float32), y, steps=2, lr_schedule=lambda step: 0.0,
           optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    assert all(torch.equal(before[n], p) for n, p in net.onnx_parameters().items())


def test_module_moves_with_its_constants() -> None:
    net = ot.to_torch(lm.export(lm.GPT(TINY, 0)))
    buffers = dict(net.named_buffers())
    # Buffers, so that module.to(device) moves them; not in the state dict, which holds the weights.
    assert buffers and not net.state_dict().keys() & buffers.keys()
