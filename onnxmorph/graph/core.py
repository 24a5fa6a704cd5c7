"""Graph editing helpers over onnx-graphsurgeon: import/export, lookup, weights, naming, sorting."""

from __future__ import annotations

import ast
import collections
import contextlib
import difflib
import heapq
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxmorph.errors import InvalidModelError, NotApplicable, UsageError
from onnxmorph.io import streaming
from onnxmorph.io.loading import is_normalized, list_initializers_as_inputs, normalize, skeleton
from onnxmorph.numerics.geometry import ConvGeometry, conv_geometry, set_conv_geometry  # noqa: F401  (the graph's vocabulary)

log = logging.getLogger("onnxmorph")


LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@contextlib.contextmanager
def _quiet_graphsurgeon() -> Iterator[None]:
    """onnx-graphsurgeon logs through its own global logger: quiet it only while onnxmorph calls it."""
    logger = gs.logger.G_LOGGER
    saved = logger.severity
    logger.severity = max(saved, logger.ERROR)
    try:
        yield
    finally:
        logger.severity = saved


# --------------------------------------------------------------------------- import / export


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """A fresh, editable graph of `model` (normalised first when needed).

    Weights of the result are lazily shared with `model`: replace them by assigning a new
    gs.Constant (see `set_weight`), never by editing `.values` in place.
    """
    if not is_normalized(model):
        model = normalize(model)
    try:
        with _quiet_graphsurgeon():
            graph = gs.import_onnx(model)
    except Exception as exc:
        raise InvalidModelError(f"cannot read the graph: {exc}") from exc
    # onnx-graphsurgeon would resolve a weight kept in a file against the current directory and
    # read it whole: a streaming model's weights are mapped from their own files, when touched.
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if type(lazy) is LazyValues and streaming.is_reference(lazy.tensor):
            tensor._values = MappedValues(lazy.tensor)
        elif type(lazy) is LazyValues and lazy.tensor.data_type in _NUMPY_LACKS:
            tensor._values = TypedValues(lazy.tensor)
    graph.__dict__[_SOURCE] = model  # for module_paths, read only if a name is looked up by its module
    return graph


# Types onnx-graphsurgeon reads as float32 (numpy lacks them): read as ml_dtypes' types instead.
_NUMPY_LACKS = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
                onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ)


class TypedValues(LazyValues):
    """Lazy values of an inline bfloat16 (or float8) weight, read in its own type, not cast to float32."""

    def load(self) -> np.ndarray:
        return onnx.numpy_helper.to_array(self.tensor)


# --------------------------------------------------------------------------- module paths


def node_modules(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> the module path the exporter recorded (dynamo's name_scopes/namespace, TorchScript's names)."""
    paths = {}
    for node in model.graph.node:
        path = _module_path(node.name, {p.key: p.value for p in node.metadata_props})
        if path:
            paths[node.name] = path
    return paths


def _module_path(name: str, meta: dict[str, str]) -> str | None:
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
        except (ValueError, SyntaxError, TypeError, IndexError):
            return None
    if "namespace" in meta:
        parts = [p.split(":")[0].strip() for p in meta["namespace"].split("/") if ":" in p]
        return parts[-1] if parts and parts[-1] else None
    if name.startswith("/") and name.count("/") >= 2:
        return ".".join(name.strip("/").split("/")[:-1])
    return None


_SOURCE = "_onnxmorph_source"  # the model a graph was imported from (onnx-graphsurgeon drops node metadata)
_PATHS = "_onnxmorph_module_paths"


def module_paths(graph: gs.Graph) -> dict[str, str]:
    """Node name -> module path for the nodes of `graph` (computed once per graph, when first asked).

    From the metadata of the model the graph was imported from, else from TorchScript's node names.
    """
    # through __dict__: onnx-graphsurgeon's Graph.__getattr__ looks a missing name up as a registered function
    paths = graph.__dict__.get(_PATHS)
    if paths is None:
        source = graph.__dict__.get(_SOURCE)
        paths = node_modules(source) if source is not None else {}
        for node in graph.nodes:
            if node.name not in paths:
                path = _module_path(node.name or "", {})
                if path:
                    paths[node.name] = path
        graph.__dict__[_PATHS] = paths
        graph.__dict__.pop(_SOURCE, None)
    return paths


class MappedValues(LazyValues):
    """Lazy values of a weight kept in a file (see streaming): loading maps it, reading nothing yet.

    The mapped array remembers this object, so that a weight whose values a pass only looked at
    (a shape, a dtype) is exported as the reference again, not read and inlined.
    """

    def load(self) -> np.ndarray:
        array = streaming.map_array(self.tensor)
        if isinstance(array, np.memmap):
            array._onnxmorph_source = self
        return array


def _mapped_source(values: object) -> MappedValues | None:
    if isinstance(values, MappedValues):
        return values
    return getattr(values, "_onnxmorph_source", None) if isinstance(values, np.memmap) else None


class Analysis:
    """A model with what passes read of it, each computed once and only when asked.

    The read-only graph view, the inferred tensor shapes and facts memoised by the passes (a
    channel coupling, a solved factorisation) live here, not in module-level caches: whoever
    analyses a model (`run_passes` per step, `inspect` per model) makes one and drops it with
    the model. `counts` says how often each memoised fact was computed.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self._view: gs.Graph | None = None
        self._shapes: dict[str, tuple[int | None, ...] | None] | None = None
        self._memo: dict[Any, Any] = {}
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def view(self) -> gs.Graph:
        """A graph of the model for analysis only: never edit it (use `import_graph` for that)."""
        if self._view is None:
            self._view = import_graph(self.model)
        return self._view

    @property
    def shapes(self) -> dict[str, tuple[int | None, ...] | None]:
        if self._shapes is None:
            self._shapes = infer_shapes(self.model)
        return self._shapes

    def memo(self, kind: str, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` the first time (`kind`, `key`) is asked for, the same value afterwards."""
        if (kind, key) not in self._memo:
            self.counts[kind] += 1
            self._memo[(kind, key)] = compute()
        return self._memo[(kind, key)]


ModelOrAnalysis = Union[onnx.ModelProto, Analysis]


def analysis(model: ModelOrAnalysis) -> Analysis:
    """`model` itself when it is an Analysis, else a fresh one of it."""
    return model if isinstance(model, Analysis) else Analysis(model)


def model_of(model: ModelOrAnalysis) -> onnx.ModelProto:
    return model.model if isinstance(model, Analysis) else model


def read_view(model: ModelOrAnalysis) -> gs.Graph:
    """A graph of `model` for analysis only: the Analysis's own, or a fresh import of a ModelProto."""
    return model.view if isinstance(model, Analysis) else import_graph(model)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` to a model that keeps `like`'s IR version, opsets, metadata and docs."""
    toposort(graph)
    try:
        with _quiet_graphsurgeon():
            model = _export_copying_weights_once(graph)
    except Exception as exc:
        raise InvalidModelError(f"cannot export the graph: {exc}") from exc
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    del model.functions[:]
    model.functions.extend(like.functions)
    _keep_node_metadata(model, like)
    model.graph.name = like.graph.name
    model.graph.doc_string = like.graph.doc_string
    _restore_io_order(model, like)
    if model.ir_version < 4:
        list_initializers_as_inputs(model)
    return model


def _export_copying_weights_once(graph: gs.Graph) -> onnx.ModelProto:
    """gs.export_onnx, but each untouched parent weight is copied once instead of twice.

    onnx-graphsurgeon copies every weight into the GraphProto (make_graph) and the GraphProto
    again into the ModelProto (make_model): for VGG16 that is 1.1 GB and ~4 s. The parent's
    tensors (still lazy) are exported as empty stand-ins and then copied once into place.
    """
    lazy: dict[str, tuple[gs.Constant, LazyValues]] = {}
    relocated: list[gs.Constant] = []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        values = getattr(tensor, "_values", None)
        # A weight kept in a file whose values a pass only looked at goes out as the reference again.
        mapped = _mapped_source(values)
        values = mapped or values
        # A weight kept in a file goes out as its reference whatever its size: read into an array,
        # onnx-graphsurgeon would export its bytes still marked as external data, without a location.
        if isinstance(values, LazyValues) and (
                values.nbytes >= 1024 or mapped is not None):
            lazy[tensor.name] = (tensor, values)
            stub = onnx.TensorProto(name=tensor.name, data_type=values.tensor.data_type, dims=[0])
            tensor._values = LazyValues(stub)
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            # its values are in memory now (read, or computed): they go out inline
            relocated.append(tensor)
            tensor.data_location = None
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for tensor, values in lazy.values():
            tensor._values = values
        for tensor in relocated:
            tensor.data_location = onnx.TensorProto.EXTERNAL
    placed = 0
    for slot in model.graph.initializer:
        if slot.name in lazy:
            slot.CopyFrom(lazy[slot.name][1].tensor)
            slot.name = lazy[slot.name][0].name  # the parent's tensor keeps its own name
            placed += 1
    if placed != len(lazy):  # a stand-in went elsewhere (a subgraph): export the plain way
        return gs.export_onnx(graph, do_type_check=False)
    return model


def _keep_node_metadata(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Nodes that keep their name keep the metadata the exporter gave them (module paths); graphsurgeon drops it."""
    recorded = {n.name: n.metadata_props for n in like.graph.node if n.metadata_props and n.name}
    if recorded:
        for node in model.graph.node:
            if node.name in recorded and not node.metadata_props:
                node.metadata_props.extend(recorded[node.name])


def _restore_io_order(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Keep the parent's graph input/output declarations verbatim (names, types, shapes)."""
    parent_inputs = {i.name: i for i in like.graph.input}
    inputs = [parent_inputs.get(i.name, i) for i in model.graph.input]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    parent_outputs = {o.name: o for o in like.graph.output}
    outputs = [parent_outputs.get(o.name, o) for o in model.graph.output]
    del model.graph.output[:]
    model.graph.output.extend(outputs)


def toposort(graph: gs.Graph) -> None:
    """Sort `graph.nodes` topologically, iteratively, keeping the original order where free."""
    nodes = list(graph.nodes)
    producer: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for out in node.outputs:
            producer[out.name] = k
    indegree = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for k, node in enumerate(nodes):
        deps = set()
        for inp in node.inputs:
            p = producer.get(inp.name)
            if p is not None and p != k:
                deps.add(p)
        for sub in _subgraph_reads(node):
            p = producer.get(sub)
            if p is not None and p != k:
                deps.add(p)
        indegree[k] = len(deps)
        for p in deps:
            users[p].append(k)
    ready = [k for k in range(len(nodes)) if indegree[k] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            indegree[u] -= 1
            if indegree[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = [nodes[k].name for k in range(len(nodes)) if indegree[k] > 0][:3]
        raise InvalidModelError(f"the graph has a cycle through {', '.join(stuck)}")
    graph.nodes = [nodes[k] for k in order]


def _subgraph_reads(node: gs.Node) -> Iterable[str]:
    for value in node.attrs.values():
        subgraphs = value if isinstance(value, (list, tuple)) else [value]
        for sub in subgraphs:
            if isinstance(sub, gs.Graph):
                for inner in sub.nodes:
                    for inp in inner.inputs:
                        yield inp.name


# --------------------------------------------------------------------------- lookup


@dataclass(frozen=True)
class LayerInfo:
    """A morphable layer: a Conv/ConvTranspose/Gemm/MatMul whose weight is a constant."""

    name: str
    output: str
    op: str
    weight: str
    weight_shape: tuple[int, ...]
    bias: str | None


def weight_index(node: gs.Node) -> int | None:
    """Input index of the weight of a layer node, or None for ops that have none."""
    return 1 if node.op in LAYER_OPS else None


def layer_info(node: gs.Node) -> LayerInfo | None:
    """Describe `node` as a morphable layer, or None when it is not one."""
    if node.op not in LAYER_OPS or node.domain not in ("", "ai.onnx", None):
        return None
    k = weight_index(node)
    if k is None or len(node.inputs) <= k or not isinstance(node.inputs[k], gs.Constant):
        return None
    bias = None
    if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2:
        if isinstance(node.inputs[2], gs.Constant):
            bias = node.inputs[2].name
    weight = node.inputs[k]
    return LayerInfo(
        name=node.name,
        output=node.outputs[0].name,
        op=node.op,
        weight=weight.name,
        weight_shape=tuple(int(d) for d in weight.shape),
        bias=bias,
    )


def layers(graph: gs.Graph) -> list[LayerInfo]:
    """Every morphable layer of `graph`, in graph order."""
    found = []
    for node in graph.nodes:
        info = layer_info(node)
        if info is not None:
            found.append(info)
    return found


def find_node(graph: gs.Graph, name: str) -> gs.Node:
    """The node `name` names, as `inspect` prints it: a node name, an output tensor's name or a module path.

    A module path names the node whose output leaves the module (a `Linear`'s bias Add, say). An
    unknown name is a UsageError that lists the closest names of every kind in one line.
    """
    return _resolve(graph, name, None)


def find_layer(graph: gs.Graph, name: str, ops: Sequence[str] = LAYER_OPS) -> gs.Node:
    """The morphable layer `name` (node name, output name or module path) whose op is one of `ops`.

    A module path names the one layer of `ops` inside the module (its MatMul, not its bias Add).
    """
    node = _resolve(graph, name, tuple(ops))
    if node.op not in ops:
        raise NotApplicable(f"layer '{name}' is a {node.op}, not one of {', '.join(ops)}")
    k = weight_index(node)
    if k is None or len(node.inputs) <= k:
        raise NotApplicable(f"layer '{name}' ({node.op}) has no weight input")
    weight = node.inputs[k]
    if not isinstance(weight, gs.Constant):
        raise NotApplicable(f"layer '{name}': its weight '{weight.name}' is computed, not a constant")
    return node


def _resolve(graph: gs.Graph, name: str, ops: tuple[str, ...] | None) -> gs.Node:
    """One resolver for every option that names a place in the model (see find_node and find_layer)."""
    by_name = [n for n in graph.nodes if n.name == name]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        raise UsageError(
            f"layer '{name}': {len(by_name)} nodes share this name; refer to the layer by its "
            "output tensor instead"
        )
    for node in graph.nodes:
        if any(out.name == name for out in node.outputs):
            return node
    paths = module_paths(graph)
    inside = [n for n in graph.nodes if _within(paths.get(n.name), name)]
    if inside:
        return _module_node(graph, name, inside, paths, ops)
    raise UsageError(f"no layer '{name}' in the model; {suggest(name, _names(graph, paths, ops))}")


def _within(path: str | None, module: str) -> bool:
    return path is not None and (path == module or path.startswith(module + "."))


def _module_node(graph: gs.Graph, module: str, inside: list[gs.Node], paths: dict[str, str],
                 ops: tuple[str, ...] | None) -> gs.Node:
    """The layer of `ops` in `module` (ops given), or the node whose output leaves it."""
    if ops is not None:
        found = [n for n in inside if n.op in ops and layer_info(n) is not None]
        if not found:
            raise NotApplicable(f"module '{module}' holds no {'/'.join(ops)} layer with a constant weight")
    else:
        members = {id(n) for n in inside}
        found = [n for n in inside if any(is_graph_output(graph, t) or any(id(r) not in members for r in t.outputs)
                                          for t in n.outputs)]
    if len(found) == 1:
        return found[0]
    named = [paths[n.name] if paths.get(n.name) not in (None, module) else n.name for n in found]
    kind = "layers" if ops is not None else "outputs"
    listed = ", ".join(named[:6]) + (", ..." if len(named) > 6 else "")
    raise UsageError(f"module '{module}' has {len(found)} {kind} ({listed}); name one of them")


def _names(graph: gs.Graph, paths: dict[str, str], ops: tuple[str, ...] | None) -> list[str]:
    """What a user may write for a node (a layer of `ops` when given): node, output and module names."""
    nodes = [n for n in graph.nodes if ops is None or (n.op in ops and layer_info(n) is not None)]
    names = [n.name for n in nodes if n.name] + [t.name for n in nodes for t in n.outputs if t.name]
    return names + [paths[n.name] for n in nodes if n.name in paths]


def suggest(name: str, candidates: Iterable[str], count: int = 5) -> str:
    """'closest: a, b, c' for an unknown `name` (difflib over `candidates`), for one-line errors."""
    unique = list(dict.fromkeys(c for c in candidates if c))
    close = difflib.get_close_matches(name, unique, n=count, cutoff=0.6)
    if not close:  # a short or odd name: the names that contain it, if any
        close = [c for c in unique if name and name.lower() in c.lower()][:count]
    if close:
        return "closest: " + ", ".join(close) + " (`inspect` lists them all)"
    return "no close match (`inspect` lists them)"


def exclusive_constant(node: gs.Node, k: int, what: str = "weight") -> gs.Constant:
    """Input `k` of `node`, which must be a constant used by no other node."""
    tensor = node.inputs[k]
    if not isinstance(tensor, gs.Constant):
        raise NotApplicable(f"layer '{node.name}': its {what} '{tensor.name}' is not a constant")
    users = [n for n in tensor.outputs if n is not node]
    if users:
        raise NotApplicable(
            f"layer '{node.name}': its {what} '{tensor.name}' is shared with '{users[0].name}'"
        )
    return tensor


def values(tensor: gs.Constant) -> np.ndarray:
    """The array of a constant (read-only: never edit it in place, it may be the parent's)."""
    array = np.asarray(tensor.values)
    array.flags.writeable = False
    return array


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None




def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor or t.name == tensor.name for t in graph.outputs)


# --------------------------------------------------------------------------- editing


class Namer:
    """Unique, explanatory names for new nodes and tensors: `conv2/morph_deepen/conv_a`."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken = {node.name for node in graph.nodes}
        self.taken.update(graph.tensors().keys())

    def __call__(self, *parts: str) -> str:
        base = "/".join(p for p in parts if p)
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def fresh_scope(namer: Namer, *parts: str) -> str:
    """A scope name that neither is taken nor prefixes a taken name, so names under it stay as given."""
    base = "/".join(p for p in parts if p)
    scope, k = base, 1
    while scope in namer.taken or any(t.startswith(scope + "/") for t in namer.taken):
        k += 1
        scope = f"{base}_{k}"
    namer.taken.add(scope)
    return scope


def remove_node(graph: gs.Graph, node: gs.Node) -> tuple[list[gs.Tensor], list[gs.Tensor]]:
    """Take `node` out of `graph`, detached from its tensors; returns (its inputs, its outputs).

    Its outputs then have no producer: the caller builds what writes them (a replacement module).
    """
    inputs, outputs = list(node.inputs), list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    return inputs, outputs


def replace_all_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor, readers: Iterable[gs.Node] | None = None,
                     *, renamed: str | None = None) -> None:
    """Every reader of `old` (or those in `readers`, taken before new readers were added) reads `new`.

    When `old` is a graph output, `new` takes its place and its name, so the model's interface
    stays as it was, and `old` is called `renamed` (required then).
    """
    for node in list(old.outputs) if readers is None else list(readers):
        for k, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[k] = new  # item assignment keeps onnx-graphsurgeon's reader lists in step
    if is_graph_output(graph, old):
        if renamed is None:
            raise ValueError(f"'{old.name}' is a graph output: replacing it needs a new name for it")
        name = old.name
        old.name = renamed
        new.name = name
        graph.outputs = [new if t is old else t for t in graph.outputs]


def constant(name: str, array: np.ndarray, dtype: np.dtype | type) -> gs.Constant:
    """A new constant holding a fresh copy of `array` cast to `dtype`.

    While `streaming.spilling()` is on, a large one is written to a scratch file at once (cast on
    the way, no copy of it made) and held as a reference: a pass that recomputes every weight
    holds one at a time (see streaming).
    """
    spilled = streaming.spill(name, np.asarray(array), np.dtype(dtype))
    if spilled is not None:
        return gs.Constant(name, MappedValues(spilled))
    return gs.Constant(name, np.ascontiguousarray(np.array(array, dtype=dtype, copy=True)))


def set_input_constant(node: gs.Node, k: int, array: np.ndarray, name: str | None = None) -> gs.Constant:
    """Replace input `k` of `node` by a new constant (same name and dtype unless told).

    Assigning a new tensor, instead of editing `.values`, is what keeps the parent's arrays
    (lazily shared by onnx-graphsurgeon) untouched.
    """
    old = node.inputs[k]
    dtype = dtype_of(old) if isinstance(old, gs.Constant) else array.dtype
    new = constant(name or old.name, array, dtype)
    node.inputs[k] = new
    return new




def dtype_of(tensor: gs.Tensor) -> np.dtype:
    """The element type of a tensor (float32 where the graph does not say).

    onnx-graphsurgeon gives a type numpy lacks (bfloat16) as its ONNX number: mapped through onnx.
    """
    if tensor.dtype is None:
        return np.dtype(np.float32)
    if isinstance(tensor.dtype, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype))
    return np.dtype(tensor.dtype)


def opset(model_or_graph: ModelOrAnalysis | gs.Graph) -> int:
    """The default-domain opset version of a model or graph."""
    if isinstance(model_or_graph, gs.Graph):
        return int(model_or_graph.opset)
    for entry in model_of(model_or_graph).opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


# --------------------------------------------------------------------------- shapes

def tensor_shapes(model: ModelOrAnalysis) -> dict[str, tuple[int | None, ...] | None]:
    """The Analysis's inferred shapes, or those of a ModelProto inferred now (see `infer_shapes`)."""
    return model.shapes if isinstance(model, Analysis) else infer_shapes(model)


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...] | None]:
    """Shapes of the model's tensors by onnx shape inference (None dims are unknown).

    A dynamic batch dimension (axis 0 of an input) is taken as 1 so that shape ops after it
    still infer; the spatial and channel dims that morphs need are not affected by it.
    """
    # Inference needs the weights' dims, not their data (a copy of which costs the model's size).
    probe = skeleton(model)
    # declared shapes are dropped (they may be stale), except those of what onnx cannot infer: the
    # outputs of other domains' ops (onnxruntime's fused norms), which inference continues from
    foreign = {name for node in probe.graph.node if node.domain not in ("", "ai.onnx") for name in node.output}
    kept = [info for info in probe.graph.value_info if info.name in foreign]
    del probe.graph.value_info[:]
    probe.graph.value_info.extend(kept)
    for info in probe.graph.input:
        dims = info.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception as exc:  # an inference failure only means the shapes stay unknown
        log.debug("shape inference failed: %s", exc)
        inferred = probe
    shapes: dict[str, tuple[int | None, ...] | None] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = info.type.tensor_type
        if not tt.HasField("shape"):
            shapes.setdefault(info.name, None)
            continue
        shapes[info.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes
