"""Tests of onnxmorph.train: ONNX -> torch -> ONNX round trip, and training moves the morph's weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from conftest import REFERENCE_MODELS, reference_model  # noqa: E402  (after the torch check)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402  (after the torch check)

import onnxmorph  # noqa: E402  (after the torch check)
from onnxmorph import train as ot  # noqa: E402  (after the torch check)
from onnxmorph.errors import UsageError  # noqa: E402  (after the torch check)
from onnxmorph.verification.verifier import random_inputs, resolve_shapes  # noqa: E402  (after the torch check)

# One thread: these tensors are too small for intra-op threads, and on a busy 2-core machine a
# second thread made a step up to 100x slower (measured: 60 steps of a tiny MLP, 8 s against 0.07 s).
torch.set_num_threads(1)

RNG = np.random.default_rng(0)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _parent_mlp() -> onnx.ModelProto:
    """x[N,8] -> Gemm(6) -> Tanh -> Gemm(3)."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
        helper.make_node("Tanh", ["h"], ["t"], name="act1"),
        helper.make_node("Gemm", ["t", "fc2.w", "fc2.b"], ["y"], name="fc2", transB=1),
    ]
    inits = [_init("fc1.w", rng.standard_normal((6, 8)) * 0.4), _init("fc1.b", rng.standard_normal(6) * 0.1),
             _init("fc2.w", rng.standard_normal((3, 6)) * 0.4), _init("fc2.b", rng.standard_normal(3) * 0.1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _hand_deepened(parent: onnx.ModelProto) -> onnx.ModelProto:
    """fc1 split into fc1a -> PRelu(a=1) -> fc1b -> P-tanh(a=1) by hand: W = Q (Q^T W), exact.

    Stands for what the deepen pass makes, so the adapter is tested independently of the pass.
    """
    weights = {t.name: numpy_helper.to_array(t) for t in parent.graph.initializer}
    q, _ = np.linalg.qr(RNG.standard_normal((6, 6)))
    nodes = [
        helper.make_node("Gemm", ["x", "fc1a.w", "fc1a.b"], ["h1"], name="fc1/morph_deepen/fc_a", transB=1),
        helper.make_node("PRelu", ["h1", "fc1/morph_deepen/slope"], ["h1p"], name="fc1/morph_deepen/prelu"),
        helper.make_node("Gemm", ["h1p", "fc1b.w", "fc1b.b"], ["h2"], name="fc1/morph_deepen/fc_b", transB=1),
        # P-tanh: (1 - a) * tanh(h2) + a * h2
        helper.make_node("Tanh", ["h2"], ["h2t"], name="ptanh/tanh"),
        helper.make_node("Sub", ["one", "ptanh/act_a"], ["oma"], name="ptanh/sub"),
        helper.make_node("Mul", ["oma", "h2t"], ["m1"], name="ptanh/mul1"),
        helper.make_node("Mul", ["ptanh/act_a", "h2"], ["m2"], name="ptanh/mul2"),
        helper.make_node("Add", ["m1", "m2"], ["h"], name="ptanh/add"),
        *parent.graph.node[1:],
    ]
    inits = [_init("fc1a.w", q.T @ weights["fc1.w"]), _init("fc1a.b", q.T @ weights["fc1.b"]),
             _init("fc1/morph_deepen/slope", np.ones(6)), _init("fc1b.w", q), _init("fc1b.b", np.zeros(6)),
             _init("one", [1.0]), _init("ptanh/act_a", [1.0]),
             *[t for t in parent.graph.initializer if t.name.startswith("fc2")]]
    graph = helper.make_graph(nodes, "mlp_deep", list(parent.graph.input), list(parent.graph.output), inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _run_torch(net: ot.OnnxModule, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = net(*[torch.from_numpy(feeds[n]) for n in net.input_names])
    return (out[0] if isinstance(out, tuple) else out).numpy()


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("stem", REFERENCE_MODELS)
def test_module_matches_onnxruntime_and_round_trip_is_exact(stem: str) -> None:
    model = reference_model(stem)
    net = ot.to_torch(model)
    feeds = random_inputs(model, resolve_shapes(model, None), np.random.default_rng(3))
    np.testing.assert_allclose(_run_torch(net, feeds), _ort(model, feeds), rtol=1e-4, atol=1e-5)
    back = ot.to_onnx(net)
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in model.graph.node]
    for a, b in zip(back.graph.initializer, model.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert onnxmorph.verify(model, back, trials=1)


def test_every_float_weight_is_a_trainable_parameter_except_bn_statistics() -> None:
    model = reference_model("vgg_bn")
    net = ot.to_torch(model)
    names = set(net.onnx_parameters())
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bn, "vgg_bn has batch norms"
    for node in bn:
        assert node.input[1] in names and node.input[2] in names
        assert node.input[3] not in names and node.input[4] not in names
    assert all(p.requires_grad for p in net.parameters())
    frozen = ot.to_torch(model, trainable=lambda name: "conv" not in name)
    assert any(not p.requires_grad for p in frozen.parameters())


def test_hand_morphed_child_round_trip_and_one_step_moves_new_weights_and_a() -> None:
    parent = _parent_mlp()
    child = _hand_deepened(parent)
    assert onnxmorph.verify(parent, child)
    net = ot.to_torch(child)
    alphas = ot.activation_parameters(net)
    assert set(alphas) == {"fc1/morph_deepen/slope", "ptanh/act_a"}
    assert all(torch.all(a == 1) for a in alphas.values())

    # ONNX -> torch -> ONNX is the same function, before any training.
    feeds = {"x": np.random.default_rng(5).uniform(-2, 2, (16, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run_torch(net, feeds), _ort(child, feeds), rtol=1e-5, atol=1e-6)
    assert onnxmorph.verify(child, ot.to_onnx(net))

    before = {name: p.detach().clone() for name, p in net.onnx_parameters().items()}
    x = np.random.default_rng(6).uniform(-2, 2, (32, 8)).astype(np.float32)
    y = np.random.default_rng(7).integers(0, 3, 32)
    losses = ot.fit(net, x, y, loss="cross_entropy", optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                    steps=1, batch_size=32)
    assert len(losses) == 1 and np.isfinite(losses[0])
    after = net.onnx_parameters()
    for name in ["fc1a.w", "fc1b.w", "fc1/morph_deepen/slope", "ptanh/act_a"]:
        assert not torch.equal(before[name], after[name]), f"{name} did not move"
    # The gradient of the loss pushes `a` away from 1 (toward a non-linear activation or past it);
    # either way it is trainable, which is what the morph needs.

    trained = ot.to_onnx(net)
    assert [i.name for i in trained.graph.initializer] == [i.name for i in child.graph.initializer]
    np.testing.assert_allclose(_ort(trained, feeds), _run_torch(net, feeds), rtol=1e-5, atol=1e-6)
    assert not onnxmorph.verify(child, trained), "trained weights must reach the exported model"


def test_fit_is_deterministic_for_a_seed() -> None:
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 100)
    results = []
    for _ in range(2):
        net = ot.to_torch(_parent_mlp())
        ot.fit(net, x, y, steps=5, batch_size=16, seed=3)
        results.append(ot.predict(net, x))
    np.testing.assert_array_equal(results[0], results[1])


def test_fit_reduces_the_loss() -> None:
    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    net = ot.to_torch(_parent_mlp())
    losses = ot.fit(net, x, y, optimizer=lambda p: torch.optim.Adam(p, lr=3e-2), steps=60, batch_size=50)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def test_unsupported_ops_and_bad_arguments_are_refused() -> None:
    model = _parent_mlp()
    model.graph.node[1].op_type = "Unique"
    with pytest.raises(UsageError, match="cannot run Unique .node 'act1'.: not among the ops"):
        ot.to_torch(model)
    net = ot.to_torch(_parent_mlp())
    with pytest.raises(UsageError, match="unknown loss"):
        ot.fit(net, np.zeros((4, 8), np.float32), np.zeros(4, np.int64), loss="hinge", steps=1)
    with pytest.raises(UsageError, match="one length"):
        ot.fit(net, np.zeros((4, 8), np.float32), np.zeros(3, np.int64), steps=1)
    with pytest.raises(UsageError, match="no trainable initializer"):
        net.parameter("nope")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_deepen_pass_child_trains_through_the_adapter(activation: str) -> None:
    parent = reference_model("cifar10_quick")
    layer = next(n.name for n in parent.graph.node if n.op_type == "Conv")
    child = onnxmorph.deepen(parent, layer=layer, kernel=3, activation=activation, method="netmorph", seed=0)
    net = ot.to_torch(child)
    alphas = ot.activation_parameters(net)
    assert len(alphas) == 1 and all(torch.all(a == 1) for a in alphas.values())
    assert onnxmorph.verify(child, ot.to_onnx(net), trials=1)
    new = {name: p.detach().clone() for name, p in net.onnx_parameters().items() if "/morph_deepen/" in name}
    assert len(new) >= 3  # two new weights (and biases) and `a`
    shapes = resolve_shapes(child, None)
    x = np.random.default_rng(0).uniform(-1, 1, [4, *shapes[net.input_names[0]][1:]]).astype(np.float32)
    ot.fit(net, x, np.arange(4) % 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05), steps=1, batch_size=4)
    params = net.onnx_parameters()
    moved = [name for name in new if not torch.equal(new[name], params[name])]
    assert set(alphas) <= set(moved)
    assert sum(name.endswith("/weight") for name in moved) >= 2, moved
