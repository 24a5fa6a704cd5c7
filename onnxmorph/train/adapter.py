"""The training adapter: an ONNX graph as a torch module (see `onnxmorph.train`), fitting and predicting."""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnxmorph import limits
from onnxmorph.errors import UsageError, one_line
from onnxmorph.graph.build import P_ACTIVATION_SUFFIX
from onnxmorph.io.loading import true_inputs
from onnxmorph.io.safety import check_declared_sizes
from onnxmorph.limits import quote
from onnxmorph.train.ops import SUPPORTED_OPS, Call, check_graph, resolve
from onnxmorph.train.ops_shape import from_numpy

__all__ = [
    "IGNORE_INDEX",
    "OnnxModule",
    "SUPPORTED_OPS",
    "activation_parameters",
    "causal_lm_labels",
    "fit",
    "predict",
    "to_onnx",
    "to_torch",
]

# A P-activation's `a` is an initializer named `<scope>/act_a` (onnxmorph/build.py); a PRelu's
# slope is also recognised by position, whatever its name.
ACTIVATION_SUFFIXES = (P_ACTIVATION_SUFFIX,)

# Labels that the token losses skip (padding), as in torch and Hugging Face.
IGNORE_INDEX = -100

Inputs = Union[np.ndarray, torch.Tensor, Mapping[str, Any], Sequence[Any]]
LossLike = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
OptimizerLike = Union[torch.optim.Optimizer, Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer], None]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# Half-precision weights are trained as float32 copies (master weights) and cast for each forward pass.
_HALF_TYPES = {onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16}

_EXTERNAL = onnx.TensorProto.EXTERNAL

# Inputs that are running statistics, not weights: gradient descent must not move them.
_STATISTICS = {"BatchNormalization": (3, 4)}

# Ops whose output does not depend on their input's values through anything a weight should learn:
# positional tables (sin/cos of a frequency buffer), sizes.
_TABLE_OPS = ("Sin", "Cos")
_SIZE_OPS = ("Shape", "Size")


# --------------------------------------------------------------------------- which initializers train


def _torch_key(name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", name) or "_"
    if key[0].isdigit():
        key = "_" + key
    base, k = key, 1
    while key in taken:
        key, k = f"{base}_{k}", k + 1
    taken.add(key)
    return key


def _activation_names(nodes: Iterable[onnx.NodeProto], names: Iterable[str]) -> list[str]:
    """Names of the P-activation parameters: PRelu slopes and initializers named with a P-activation suffix."""
    found = [n.input[1] for n in nodes if n.op_type == "PRelu" and len(n.input) > 1]
    found += [name for name in names if name.endswith(ACTIVATION_SUFFIXES)]
    return list(dict.fromkeys(found))


def _learnable(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose values reach a graph output other than through Sin/Cos (a positional table) or a size."""
    producer = {out: node for node in graph.node for out in node.output if out}
    seen: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None and node.op_type not in _TABLE_OPS + _SIZE_OPS:
            stack.extend(i for i in node.input if i)
    return seen


def _position_tables(graph: onnx.GraphProto, names: Iterable[str]) -> set[str]:
    """Those of `names` whose every Sin/Cos reads positions, not features: no float graph input reaches it.

    Rotary and sinusoidal tables are sin/cos of frequencies times integer positions; a SIREN's sin(W x + b) reads
    the float input x.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                   onnx.TensorProto.BFLOAT16)
    features = {i.name for i in graph.input if i.type.tensor_type.elem_type in float_types}
    for node in graph.node:  # nodes are in topological order
        if any(name in features for name in node.input) and node.op_type not in _SIZE_OPS:
            features.update(node.output)
    tables = set()
    for start in names:
        stack, seen, positions = [start], {start}, True
        while stack and positions:
            for node in consumers.get(stack.pop(), ()):
                if node.op_type in _TABLE_OPS:
                    positions = node.input[0] not in features
                    continue
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        stack.append(out)
        if positions:
            tables.add(start)
    return tables


def _default_trainable(model: onnx.ModelProto) -> Callable[[str], bool]:
    """Every float initializer except constants of the graph's formulas.

    Constants are: single numbers that are not P-activation parameters (GELU's 0.5 and sqrt 2, the
    attention scale, the `1` of a P-activation's `1 - a`), masks (tensors holding an infinity or NaN,
    or only 0 and one number <= -100), and vectors that reach the outputs only through Sin/Cos of
    positions (rotary frequencies, a buffer in the source model: no float input reaches those
    Sin/Cos). Training them would change what the graph computes rather than fit its weights.
    """
    arrays = {t.name: t for t in model.graph.initializer}
    activations = set(_activation_names(model.graph.node, arrays))
    reach = _learnable(model.graph)
    # Vectors that the outputs see only through Sin/Cos of positions: the frequencies of a table (a rotary
    # embedding's inv_freq); a SIREN's sin(W x + b) is no table.
    vectors = [name for name, t in arrays.items() if name not in reach and sum(d > 1 for d in t.dims) == 1]
    frequencies = _position_tables(model.graph, vectors)

    def trainable(name: str) -> bool:
        if name in activations:
            return True
        tensor = arrays.get(name)
        if tensor is None or int(np.prod(tensor.dims)) <= 1 or name in frequencies:
            return False
        values = _float_array(tensor)
        return bool(np.isfinite(values).all()) and not _additive_mask(values)

    return trainable


def _additive_mask(values: np.ndarray) -> bool:
    """0 where attention may look and one large negative number elsewhere (Swin's shifted windows: -100)."""
    low, high = float(values.min()), float(values.max())
    return high == 0.0 and low <= -100.0 and bool(np.all((values == 0) | (values == low)))


def _array(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's values; UsageError when its data does not make its dims (a model built in memory)."""
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"initializer '{quote(tensor.name, 120)}' {list(tensor.dims)}: its data does not make its "
                         f"dims ({quote(one_line(exc), 120)})") from None


def _float_array(tensor: onnx.TensorProto) -> np.ndarray:
    array = _array(tensor)
    return np.asarray(array, np.float32) if array.dtype.name == "bfloat16" else array


def _tied_heads(model: onnx.ModelProto, floats: Mapping[str, onnx.TensorProto]) -> dict[str, tuple[str, bool]]:
    """Output heads that the exporter wrote as a copy of a token embedding table: head -> (table, transposed).

    Tied embeddings (GPT-2, BERT, OPT, Gemma...) are one tensor in the source model; both exporters
    write the head's MatMul operand as its own initializer, equal to the table or its transpose.
    Training keeps them one parameter, as the source model would. Only a table read by a Gather
    (an embedding) and a head read by a MatMul/Gemm qualify, and only with equal values (a zero or
    constant table ties nothing).
    """
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in floats
              and not any(a.name == "axis" and a.i != 0 for a in n.attribute)}
    heads = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
             and n.input[1] in floats} - tables
    found: dict[str, tuple[str, bool]] = {}
    for table in tables:
        t = floats[table]
        if len(t.dims) != 2 or int(np.prod(t.dims)) < 2:
            continue
        values = None
        for head in sorted(heads - set(found)):
            h = floats[head]
            if h.data_type != t.data_type or sorted(h.dims) != sorted(t.dims):
                continue
            if values is None:
                values = _float_array(t)
                if values.min() == values.max():
                    break
            other = _float_array(h)
            if tuple(h.dims) == tuple(t.dims) and np.array_equal(other, values):
                found[head] = (table, False)
            elif tuple(h.dims) == tuple(reversed(t.dims)) and np.array_equal(other, values.T):
                found[head] = (table, True)
    return found


# --------------------------------------------------------------------------- the module


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class OnnxModule(torch.nn.Module):
    """An ONNX graph run by torch operators, its float initializers held as `torch.nn.Parameter`s.

    Call it with the graph's true inputs (positionally, in graph order, or by name); it returns
    the single output, or a tuple when the graph has several. Parameters are registered under
    sanitised names; `onnx_names` maps each ONNX initializer name to its parameter. The graph runs
    as it is (nothing is folded or rewritten), so `to_onnx` gives back the same graph.
    """

    def __init__(self, model: onnx.ModelProto, *, trainable: Callable[[str], bool] | None = None,
                 tie_embeddings: bool = True) -> None:
        super().__init__()
        graph = model.graph
        # A model held in memory gets the checks `load` makes of a file: its weights in it, of the sizes declared.
        external = next((t.name for t in graph.initializer if t.data_location == _EXTERNAL), None)
        if external is not None:
            raise UsageError(f"initializer '{quote(external, 120)}' is in external data, which a model held in memory "
                             "does not resolve: pass the model's path to to_torch (onnxmorph.load reads it safely)")
        check_declared_sizes(model, "the model")
        opset = _opset(model)
        functions = {(f.domain, f.name) for f in model.functions}
        check_graph(graph.node, opset, functions)
        runnable = model
        if functions:
            import onnx.inliner

            runnable = onnx.inliner.inline_local_functions(model)
            check_graph(runnable.graph.node, opset)  # what the functions held
        self._model = model
        self._opset = opset
        self.input_names = [i.name for i in true_inputs(model)]
        self.output_names = [o.name for o in graph.output]
        # Constant nodes are evaluated once into buffers, so that `module.to(device)` moves them too.
        self._constant_keys: dict[str, str] = {}
        taken: set[str] = set()
        nodes: list[onnx.NodeProto] = []
        calls: list[tuple[Call, Callable[..., Any]]] = []
        max_bytes = limits.MODEL_BYTES.value()  # one tensor a node makes (Call.room)
        for node in _run_order(runnable.graph):
            call, function = Call.of(node, opset, max_bytes), resolve(node, opset).function
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                key = "const_" + _torch_key(node.output[0], taken)
                self.register_buffer(key, function(call), persistent=False)
                self._constant_keys[node.output[0]] = key
            else:
                nodes.append(node)
                calls.append((call, function))
        self._calls = calls
        self._release = self._last_uses(nodes, self.output_names)
        statistics = {n.input[k] for n in graph.node for k in _STATISTICS.get(n.op_type, ()) if k < len(n.input)}
        if trainable is None:
            trainable = _default_trainable(model)
        floats = {t.name: t for t in graph.initializer if t.data_type in _FLOAT_TYPES and t.name not in statistics}
        # head -> (table, transposed): computed from the table's parameter in every forward pass.
        self.tied: dict[str, tuple[str, bool]] = _tied_heads(model, floats) if tie_embeddings else {}
        self.params = torch.nn.ParameterDict()
        # Constants are non-persistent buffers, so that `module.to(device)` moves them with the weights.
        self._half: dict[str, torch.dtype] = {}
        self.onnx_names: dict[str, str] = {}
        for init in graph.initializer:
            if init.name in self.tied:
                continue
            key = _torch_key(init.name, taken)
            if init.name in floats:
                data = from_numpy(_float_array(init))
                if init.data_type in _HALF_TYPES:
                    data = data.float()
                    self._half[init.name] = _HALF_TYPES[init.data_type]
                self.params[key] = torch.nn.Parameter(data, requires_grad=trainable(init.name))
                self.onnx_names[init.name] = key
            else:
                self.register_buffer("const_" + key, from_numpy(_array(init)), persistent=False)
                self._constant_keys[init.name] = "const_" + key

    @staticmethod
    def _last_uses(nodes: Sequence[onnx.NodeProto], outputs: Iterable[str]) -> list[list[str]]:
        """Per node, the tensors that no later node reads: freed after it runs (inference keeps less memory)."""
        keep = set(outputs)
        last: dict[str, int] = {}
        for k, node in enumerate(nodes):
            for name in node.input:
                last[name] = k
        release: list[list[str]] = [[] for _ in nodes]
        for name, k in last.items():
            if name and name not in keep:
                release[k].append(name)
        return release

    def parameter(self, onnx_name: str) -> torch.nn.Parameter:
        """The parameter of the ONNX initializer `onnx_name`."""
        try:
            return self.params[self.onnx_names[onnx_name]]
        except KeyError:
            raise UsageError(f"no trainable initializer named {onnx_name!r}") from None

    def onnx_parameters(self) -> dict[str, torch.nn.Parameter]:
        """ONNX initializer name -> parameter, for every float initializer (a tied head is its table's)."""
        return {name: self.params[key] for name, key in self.onnx_names.items()}

    @property
    def model(self) -> onnx.ModelProto:
        """The ONNX model this module was built from; its weights are the original ones."""
        return self._model

    def weights(self) -> dict[str, torch.Tensor]:
        """Every float initializer's current value as the graph reads it (half-precision ones cast, tied heads
        computed from their table)."""
        values: dict[str, torch.Tensor] = {}
        for name, key in self.onnx_names.items():
            value = self.params[key]
            values[name] = value.to(self._half[name]) if name in self._half else value
        for head, (table, transposed) in self.tied.items():
            values[head] = values[table].t() if transposed else values[table]
        return values

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        env: dict[str, torch.Tensor | None] = {"": None}
        if len(args) > len(self.input_names):
            raise UsageError(f"the model takes {len(self.input_names)} input(s), got {len(args)}")
        env.update(zip(self.input_names, args))
        unknown = [name for name in kwargs if name not in self.input_names]
        if unknown:
            raise UsageError(f"unknown model input(s) {', '.join(unknown)}; inputs: {', '.join(self.input_names)}")
        env.update(kwargs)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise UsageError(f"missing model input(s): {', '.join(missing)}")
        env.update({name: getattr(self, key) for name, key in self._constant_keys.items()})
        env.update(self.weights())
        for (call, function), release in zip(self._calls, self._release):
            try:
                result = function(call, *[env[name] for name in call.node.input])
            except _VALUE_ERRORS as exc:
                # what torch refuses on these values (a Reshape that does not fit, TopK's k over the axis, an index
                # out of range): one line naming the node, as a refusal of onnxmorph's own would
                raise UsageError(f"node '{limits.quote(call.name, 120)}' ({call.node.op_type}) cannot run on these "
                                 f"inputs: {limits.quote(one_line(exc), 240)}") from exc
            if isinstance(result, tuple):
                env.update((name, value) for name, value in zip(call.node.output, result) if name)
            else:
                env[call.node.output[0]] = result
            for name in release:
                env.pop(name, None)
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


# What an op raises on values it cannot take (torch's RuntimeError and IndexError, a Range's ZeroDivisionError or
# OverflowError); TypeError and the rest are bugs of onnxmorph and stay what they are.
_VALUE_ERRORS = (RuntimeError, IndexError, ValueError, ZeroDivisionError, OverflowError)


def _run_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in an order that runs (its own when it is sorted, as ONNX requires), or UsageError.

    Refused in one line, before anything runs: a node that reads a tensor nothing makes, nodes that read
    each other's outputs in a cycle, a graph output that no node, input or initializer makes.
    """
    nodes = list(graph.node)
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {out: k for k, node in enumerate(nodes) for out in node.output if out and out not in known}
    for node in nodes:
        missing = next((name for name in node.input if name not in known and name not in producer), None)
        if missing is not None:
            raise UsageError(f"node '{quote(_node_name(node), 120)}' ({node.op_type}) reads '{quote(missing, 120)}', "
                             "which no node, graph input or initializer makes")
    missing = next((o.name for o in graph.output if o.name not in known and o.name not in producer), None)
    if missing is not None:
        raise UsageError(f"graph output '{quote(missing, 120)}' is made by no node, graph input or initializer")
    needs = [{producer[name] for name in node.input if name in producer} for node in nodes]
    if all(max(before, default=-1) < k for k, before in enumerate(needs)):
        return nodes
    # Kahn's order, the graph's own among the nodes ready at once
    readers: list[list[int]] = [[] for _ in nodes]
    for k, before in enumerate(needs):
        for j in before:
            readers[j].append(k)
    count = [len(before) for before in needs]
    ready = [k for k, c in enumerate(count) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for r in readers[k]:
            count[r] -= 1
            if count[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(nodes):
        stuck = next(node for k, node in enumerate(nodes) if count[k])
        raise UsageError(f"node '{quote(_node_name(stuck), 120)}' ({stuck.op_type}) and "
                         f"{sum(1 for c in count if c) - 1} other node(s) wait on each other's outputs (a cycle)")
    return order


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


# --------------------------------------------------------------------------- public API


def to_torch(model: onnx.ModelProto | str, *, trainable: Callable[[str], bool] | None = None,
             tie_embeddings: bool = True) -> OnnxModule:
    """Load an ONNX model (ModelProto or path) as a trainable `OnnxModule`.

    Every float initializer becomes a parameter (BatchNormalization's running mean and variance stay
    constants; float16/bfloat16 weights train as float32 copies, cast for each forward pass). By
    default the graph's constants are frozen (see `_default_trainable`): single numbers other than
    P-activation parameters, masks holding infinities, rotary frequencies; `trainable(name)` replaces
    that rule. With `tie_embeddings`, an output head that the exporter wrote as a copy of the token
    embedding table trains as that table (see `_tied_heads`).
    """
    if not isinstance(model, onnx.ModelProto):
        if not isinstance(model, (str, os.PathLike)):
            raise UsageError(f"to_torch takes an onnx.ModelProto or a path, not {type(model).__name__}")
        from onnxmorph.io.loading import load

        model = load(model)
    return OnnxModule(model, trainable=trainable, tie_embeddings=tie_embeddings)


def to_onnx(module: OnnxModule) -> onnx.ModelProto:
    """The module's ONNX model with every float initializer replaced by the module's current value.

    The graph, names, opset, metadata and receipt are those of the model the module was built
    from; values are cast back to each initializer's own dtype (a tied head is written from its table).
    """
    model = onnx.ModelProto()
    model.CopyFrom(module.model)
    with torch.no_grad():
        values = module.weights()
    for k, init in enumerate(model.graph.initializer):
        if init.name not in values:
            continue
        tensor = values[init.name].detach().cpu()
        if tensor.dtype == torch.bfloat16:
            array = tensor.float().numpy().astype(helper.tensor_dtype_to_np_dtype(init.data_type))
        else:
            array = tensor.numpy().astype(helper.tensor_dtype_to_np_dtype(init.data_type))
        model.graph.initializer[k].CopyFrom(numpy_helper.from_array(array, init.name))
    return model


def activation_parameters(module: OnnxModule) -> dict[str, torch.nn.Parameter]:
    """The P-activation parameters of a morphed model: ONNX name -> parameter.

    These are the slopes of PRelu nodes and the initializers named with a P-activation suffix
    (`ACTIVATION_SUFFIXES`); at morph time they are 1 (a linear activation), and training moves
    them toward 0 (the plain non-linearity).
    """
    params = module.onnx_parameters()
    names = _activation_names(module.model.graph.node, module.onnx_names)
    return {name: params[name] for name in names if name in params}


# --------------------------------------------------------------------------- losses


def _causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: the logits at position t predict label t + 1; IGNORE_INDEX labels are skipped."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise UsageError(f"causal_lm needs logits [batch, sequence, vocabulary] and labels [batch, sequence], "
                         f"got {list(logits.shape)} and {list(labels.shape)}")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


def _token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position with the classes on the last axis (masked LM, CTC frames, tagging)."""
    if labels.shape != logits.shape[:-1]:
        raise UsageError(f"token_cross_entropy needs labels shaped like the logits without their last axis, "
                         f"got {list(logits.shape)} and {list(labels.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long(),
                           ignore_index=IGNORE_INDEX)


def _mse(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of targets shaped like the output, or of as many values per example ([N] for [N, 1]).

    F.mse_loss would broadcast [N] against [N, 1] into N x N differences, with only a warning.
    """
    if output.shape != targets.shape and output.dim() and targets.dim() and len(output) == len(targets) \
            and output.numel() == targets.numel():
        targets = targets.reshape(output.shape)
    if output.shape != targets.shape:
        raise UsageError(f"mse needs targets shaped like the output, got {list(output.shape)} and "
                         f"{list(targets.shape)}")
    return F.mse_loss(output, targets.to(output.dtype))


_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy, "mse": _mse, "causal_lm": _causal_lm,
    "token_cross_entropy": _token_cross_entropy,
}


def _loss_function(loss: LossLike) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if callable(loss):
        return loss
    if not isinstance(loss, str) or loss not in _LOSSES:
        raise UsageError(f"unknown loss {quote(repr(loss), 80)}; use one of {', '.join(_LOSSES)} or a callable")
    function = _LOSSES[loss]

    def checked(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Targets that do not fit the output (a class id out of range, float classes): one line, not torch's error.
        try:
            return function(output, targets)
        except _VALUE_ERRORS as exc:
            raise UsageError(f"loss '{loss}' cannot compare the output {list(output.shape)} ({output.dtype}) with the "
                             f"targets {list(targets.shape)} ({targets.dtype}): {quote(one_line(exc), 160)}") from exc

    return checked


def causal_lm_labels(input_ids: np.ndarray | torch.Tensor,
                     attention_mask: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """Labels for loss="causal_lm": the ids themselves, IGNORE_INDEX where the attention mask is 0 (padding)."""
    ids = _as_tensor(input_ids).long()
    if attention_mask is None:
        return ids.clone()
    return torch.where(_as_tensor(attention_mask).to(torch.bool), ids, IGNORE_INDEX)


# --------------------------------------------------------------------------- fitting


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError:  # text, objects: no tensor holds them
        raise UsageError(f"inputs and targets are numeric arrays, got one of {np.asarray(array).dtype}") from None


def _count(value: Any, name: str, minimum: int) -> int:
    """A whole number >= `minimum` given to fit or predict, or UsageError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be a whole number >= {minimum}, got {quote(repr(value), 40)}")
    return int(value)


class _Batches:
    """The model inputs as tensors of one length: an array, a sequence of arrays (positional inputs) or a
    mapping of input name -> array; `take(index)` gives the rows `index` of each, `call(module, rows)` runs it."""

    def __init__(self, inputs: Inputs) -> None:
        if isinstance(inputs, Mapping):
            self.names: list[str] | None = list(inputs)
            self.tensors = [_as_tensor(inputs[name]) for name in self.names]
        elif isinstance(inputs, (list, tuple)):
            self.names, self.tensors = None, [_as_tensor(x) for x in inputs]
        else:
            self.names, self.tensors = None, [_as_tensor(inputs)]
        lengths = {len(t) if t.dim() else -1 for t in self.tensors}
        if len(lengths) != 1 or lengths == {0} or -1 in lengths:
            raise UsageError(f"every input must have the same non-zero length on its first axis, got "
                             f"{[list(t.shape) for t in self.tensors]}")
        self.length = lengths.pop()

    def named(self, name: str) -> torch.Tensor | None:
        if self.names is None:
            return None
        return self.tensors[self.names.index(name)] if name in self.names else None

    def call(self, module: torch.nn.Module, index: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
        rows = [t[index].to(device) for t in self.tensors]
        out = module(**dict(zip(self.names, rows))) if self.names is not None else module(*rows)
        return out[0] if isinstance(out, tuple) else out  # the first output is the one to fit


def _make_optimizer(module: torch.nn.Module, optimizer: OptimizerLike) -> torch.optim.Optimizer:
    trainable = [p for p in module.parameters() if p.requires_grad]
    if optimizer is None:
        return torch.optim.Adam(trainable, lr=1e-3)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    return optimizer(trainable)


class _Annealer:
    """Holds the P-activations' `a` inside [-b, b], with b falling linearly to 0 over `steps` steps.

    b starts at the largest |a| (1 at morph time), so nothing moves at step 0; after `steps` steps
    every `a` is 0 and stays there: the new layers are then plain non-linear activations.
    """

    def __init__(self, module: torch.nn.Module, steps: int) -> None:
        self.alphas = list(activation_parameters(module).values()) if isinstance(module, OnnxModule) else []
        if steps < 1 or not self.alphas:
            raise UsageError("anneal_activations needs a positive number of steps and a model with P-activations")
        self.steps = steps
        self.start = max(float(a.detach().abs().max()) for a in self.alphas)

    def __call__(self, step: int) -> None:
        bound = self.start * max(0.0, 1.0 - step / self.steps)
        with torch.no_grad():
            for a in self.alphas:
                a.clamp_(-bound, bound)


def _targets(batches: _Batches, targets: np.ndarray | torch.Tensor | None, loss: LossLike) -> torch.Tensor:
    if targets is not None:
        y = _as_tensor(targets)
    elif loss == "causal_lm" and batches.named("input_ids") is not None:
        y = causal_lm_labels(batches.named("input_ids"), batches.named("attention_mask"))
    else:
        raise UsageError("targets are needed (only loss='causal_lm' with inputs {'input_ids': ..., "
                         "'attention_mask': ...} makes its labels from the ids)")
    if len(y) != batches.length:
        raise UsageError(f"inputs and targets must be of one length, got {batches.length} and {len(y)}")
    return y


def fit(
    module: torch.nn.Module,
    inputs: Inputs,
    targets: np.ndarray | torch.Tensor | None = None,
    *,
    loss: LossLike = "cross_entropy",
    optimizer: OptimizerLike = None,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    anneal_activations: int | None = None,
) -> list[float]:
    """Train `module` for `steps` minibatch steps on (`inputs`, `targets`); returns the losses.

    `inputs` is an array (a model with one input), a tuple of arrays (the inputs in order) or a dict
    of input name -> array, e.g. `{"input_ids": ids, "attention_mask": mask}`; every array has the
    examples on its first axis. The module's first output goes to the loss. `loss` is
    "cross_entropy" (classes on axis 1), "mse", "causal_lm" (next-token prediction from logits
    [batch, sequence, vocabulary]; without `targets` the labels are the input_ids, padding skipped:
    `causal_lm_labels`), "token_cross_entropy" (classes on the last axis, IGNORE_INDEX skipped) or a
    callable(output, target). `optimizer` is an optimiser over the module's parameters, or a factory
    called with its trainable parameters (default: Adam, lr 1e-3). Minibatches are drawn from a
    seeded permutation, reshuffled every epoch, so a run is reproducible, and moved to the module's
    device. `callback(step, loss)` is called after each step (step counts from 1).
    `lr_schedule(step)` multiplies every parameter group's initial learning rate at that step.
    `anneal_activations=N` pulls the P-activations' `a` to 0 over the first N steps (see
    `_Annealer`), so that the layers a morph inserted become non-linear.
    """
    steps, batch_size = _count(steps, "steps", 0), _count(batch_size, "batch_size", 1)
    seed = _count(seed, "seed", -2**63)
    if seed >= 2**64:
        raise UsageError(f"seed must be below 2**64, got {quote(seed, 40)}")
    batches = _Batches(inputs)
    y = _targets(batches, targets, loss)
    loss_fn = _loss_function(loss)
    anneal = _Annealer(module, anneal_activations) if anneal_activations is not None else None
    optimizer = _make_optimizer(module, optimizer)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, batches.length)
    order = torch.randperm(batches.length, generator=generator)
    position = 0
    losses: list[float] = []
    module.train()
    for step in range(1, steps + 1):
        if position + batch_size > batches.length:
            order, position = torch.randperm(batches.length, generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        if lr_schedule is not None:
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_schedule(step)
        optimizer.zero_grad()
        value = loss_fn(batches.call(module, index, device), y[index].to(device))
        value.backward()
        optimizer.step()
        if anneal is not None:
            anneal(step)
        losses.append(float(value.detach()))
        if callback is not None:
            callback(step, losses[-1])
    module.eval()
    return losses


def predict(module: torch.nn.Module, inputs: Inputs, *, batch_size: int = 1024) -> np.ndarray:
    """The module's (first) output on `inputs` (as `fit` takes them), computed in batches without gradients."""
    batch_size = _count(batch_size, "batch_size", 1)
    batches = _Batches(inputs)
    outputs = []
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with torch.no_grad():
        for start in range(0, batches.length, batch_size):
            out = batches.call(module, slice(start, start + batch_size), device)
            outputs.append(out.float().cpu().numpy() if out.dtype == torch.bfloat16 else out.cpu().numpy())
    return np.concatenate(outputs)
