"""The core's shared layer pieces: the layer adapter, graph rewiring helpers, the registry loader."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxmorph
from onnxmorph.analysis.channel_edits import new_slope
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph
from onnxmorph.graph import layers
from onnxmorph.numerics import geometry

ROOT = Path(__file__).resolve().parent.parent


def _gemm(trans_b: int, alpha: float, beta: float, bias_shape: tuple[int, ...] = (5,)) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    c = rng.standard_normal(bias_shape).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", alpha=alpha, beta=beta, transB=trans_b)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_gemm_reads_as_the_filter_it_applies(trans_b: int) -> None:
    model = _gemm(trans_b, alpha=0.5, beta=2.0)
    layer = layers.read_layer(model, "fc")
    x = np.random.default_rng(1).uniform(-1, 1, (3, 4)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    c = numpy_helper.to_array(model.graph.initializer[1])
    # y = x @ G^T + beta * C, with alpha and transB inside G
    assert layer.canonical().shape == (5, 4) and (layer.out_channels, layer.in_channels) == (5, 4)
    np.testing.assert_allclose(x @ layer.canonical().T + 2.0 * c, y, rtol=1e-5, atol=1e-5)
    assert layer.channel_axis == 1 and layer.rank == 2 and layer.beta == 2.0


def test_detach_folds_beta_into_a_constant_bias_and_frees_the_output() -> None:
    model = _gemm(1, alpha=1.0, beta=3.0, bias_shape=(3, 5))  # a full [M, N] C keeps its shape
    graph = mgraph.import_graph(model)
    old = layers.detach(graph, layers.read_layer(model, "fc"))
    assert not graph.nodes and not old.y.inputs and old.beta == 1.0
    np.testing.assert_allclose(old.bias, 3.0 * numpy_helper.to_array(model.graph.initializer[1]), rtol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("int weight", "not a float type"), ("shared weight", "is shared with"), ("nan weight", "NaN or infinite"),
    ("3-D matmul", "not a 2-D matrix"), ("infinite alpha", "alpha inf"),
])
def test_read_layer_refuses_in_one_line(case: str, message: str) -> None:
    w = np.ones((4, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    if case == "int weight":
        w = w.astype(np.int32)
    elif case == "shared weight":
        nodes.append(helper.make_node("MatMul", ["y", "w"], ["z"], name="mm2"))
    elif case == "nan weight":
        w[0, 0] = np.nan
    elif case == "3-D matmul":
        w = np.ones((2, 4, 4), np.float32)
    else:
        nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="mm", alpha=float("inf"))]
    out = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(NotApplicable, match=message):
        layers.read_layer(model, "mm").check_finite()


def test_replace_all_uses_keeps_a_graph_output_name() -> None:
    x = gs.Variable("x", np.float32, (2,))
    y = gs.Variable("y", np.float32, (2,))
    graph = gs.Graph(nodes=[gs.Node("Relu", inputs=[x], outputs=[y])], inputs=[x], outputs=[y], opset=13)
    reader = gs.Node("Neg", inputs=[y], outputs=[gs.Variable("z", np.float32)])
    graph.nodes.append(reader)
    new = gs.Variable("new", np.float32)
    mgraph.replace_all_uses(graph, y, new, renamed="y/before")
    assert reader.inputs[0] is new and not [n for n in y.outputs]
    assert [t.name for t in graph.outputs] == ["y"] and graph.outputs[0] is new and y.name == "y/before"
    with pytest.raises(ValueError):
        mgraph.replace_all_uses(graph, new, y)  # a graph output needs a name for what it was


def test_remove_node_detaches_it() -> None:
    x, y = gs.Variable("x", np.float32), gs.Variable("y", np.float32)
    node = gs.Node("Relu", inputs=[x], outputs=[y])
    graph = gs.Graph(nodes=[node], inputs=[x], outputs=[y])
    inputs, outputs = mgraph.remove_node(graph, node)
    assert inputs == [x] and outputs == [y] and not graph.nodes and not x.outputs and not y.inputs


def test_resized_and_inner_geometries_read_the_same_pixels() -> None:
    parent = geometry.ConvGeometry((3, 3), (1, 0), (1, 2), (2, 1), (2, 1), 1)
    grown = geometry.resized_geometry(parent, (5, 3))
    assert grown.pads_begin == (3, 0) and grown.pads_end == (3, 2)
    # a centred 1x1 inside the 3x3 reads its centre tap: pads shrink by dilation * offset
    inner = geometry.inner_geometry(parent, (1, 1))
    assert inner.pads_begin == (-1, -1) and inner.pads_end == (-1, 1)


def _imported_modules(path: Path) -> set[str]:
    """Modules `path` imports: by import statements, and by name in a string (importlib, lazy attributes).

    Imports under `if TYPE_CHECKING:` are left out: they are type names, never run.
    """
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("onnxmorph."):
            found.add(node.value)
    return found


def test_only_the_registry_loads_the_passes() -> None:
    loaders = [path.name for path in sorted((ROOT / "onnxmorph").rglob("*.py"))
               if any(m == "onnxmorph.passes" or m.startswith("onnxmorph.passes.") for m in _imported_modules(path))]
    assert loaders == ["registry.py"], loaders
    assert set(onnxmorph.REGISTRY) >= {"deepen", "widen", "kernel", "subnet", "skip", "block"}


def test_no_pass_imports_another() -> None:
    for path in sorted((ROOT / "passes").glob("*.py")):
        if path.name == "__init__.py":
            continue
        others = [m for m in _imported_modules(path) if m.startswith("onnxmorph.passes")]
        assert not others, (path.name, others)


# The layers of the house, bottom up, as docs/architecture.md lists them: each is a subpackage of
# onnxmorph (or a few top-level modules), and a module may import from its own layer and those
# below. The one exception is the registry loading the passes.
LAYERS = {
    "base": ["errors", "limits", "version", "lazy"],
    "numerics": ["numerics"],
    "io": ["io"],
    "verification": ["verification"],
    "graph": ["graph"],
    "analysis": ["analysis"],
    "contract": ["contract"],
    "passes": ["passes"],
    "pipeline": ["pipeline"],
    "tools": ["diff", "train", "search", "experiments", "hf"],
    "cli": ["cli", "__main__", "__init__"],
}
RANK = {unit: rank for rank, units in enumerate(LAYERS.values()) for unit in units}


def _source_files() -> list[Path]:
    return sorted((ROOT / "onnxmorph").rglob("*.py")) + sorted((ROOT / "passes").glob("*.py"))


def _module_name(path: Path) -> str:
    """The dotted name `path` is imported as (passes/ is installed as onnxmorph.passes)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":
        parts.insert(0, "onnxmorph")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit_of(module: str) -> str:
    """The layer unit of a dotted module name: its subpackage, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_imports_only_its_layer_and_below() -> None:
    files = _source_files()
    unplaced = sorted({_unit_of(_module_name(p)) for p in files} - set(RANK))
    assert not unplaced, f"place these in LAYERS and in docs/architecture.md's table: {unplaced}"
    upward = []
    for path in files:
        here = _unit_of(_module_name(path))
        for imported in _imported_modules(path):
            parts = imported.split(".")
            if parts[0] != "onnxmorph" or len(parts) < 2 or parts[1] not in RANK:
                continue
            target = parts[1]
            if here == "contract" and target == "passes" and path.name == "registry.py":
                continue
            if RANK[target] > RANK[here]:
                upward.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not upward, upward


def _import_graph() -> dict[str, set[str]]:
    """module -> the onnxmorph modules it imports (a `from package import module` names the module)."""
    modules = {_module_name(p): p for p in _source_files()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported_modules(path):
            if imported in modules and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    # the registry loads the passes as plugins when first asked (they import it to register): not a circle
    graph["onnxmorph.contract.registry"].discard("onnxmorph.passes")
    return graph


def test_no_import_circles() -> None:
    graph = _import_graph()
    # iterative depth-first search for a back edge; a circle is reported as the path around it
    state: dict[str, int] = {}
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                circle = path[path.index(child):] + [child]
                raise AssertionError("import circle: " + " -> ".join(circle))
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)


def test_the_architecture_page_lists_every_layer() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    table = page[page.index("| layer |"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    rows = rows[:len(LAYERS)]
    assert [row.split("|")[1].strip() for row in rows] == list(LAYERS)
    for row, units in zip(rows, LAYERS.values()):
        for unit in units:
            assert f"`{unit}" in row.split("|")[2], (unit, row)


def test_a_new_prelu_slope_cannot_overflow_a_new_channel() -> None:
    assert new_slope(np.array([0.25, 0.75], np.float32)) == 0.5  # the old slopes' mean
    # float32 mean of these is inf; a slope above 1 could push a new channel to inf, and inf * 0 is NaN
    assert new_slope(np.full(8, 3e38, np.float32)) == 1.0
    assert new_slope(np.array([3.0, 5.0], np.float32)) == 1.0
    assert new_slope(np.zeros(0, np.float32)) == 1.0
