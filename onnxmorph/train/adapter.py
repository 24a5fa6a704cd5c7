"""The training adapter: an ONNX graph as a torch module (see `onnxmorph.train`), fitting and predicting."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnxmorph.errors import UsageError
from onnxmorph.graph.build import P_ACTIVATION_SUFFIX
from onnxmorph.io.loading import normalize, true_inputs
from onnxmorph.train.ops import OPS as _TENSOR_OPS

__all__ = [
    "OnnxModule",
    "SUPPORTED_OPS",
    "activation_parameters",
    "fit",
    "predict",
    "to_onnx",
    "to_torch",
]

# A P-activation's `a` is an initializer named `<scope>/act_a` (onnxmorph/build.py); a PRelu's
# slope is also recognised by position, whatever its name.
ACTIVATION_SUFFIXES = (P_ACTIVATION_SUFFIX,)

LossLike = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
OptimizerLike = Union[torch.optim.Optimizer, Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer], None]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


# --------------------------------------------------------------------------- operators


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pad_spatial(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Apply ONNX pads [b1, b2, ..., e1, e2, ...] to the spatial axes of NC... `x`."""
    n = len(pads) // 2
    if not any(pads):
        return x
    torch_pads: list[int] = []
    for axis in reversed(range(n)):  # F.pad lists the last axis first
        torch_pads += [pads[axis], pads[axis + n]]
    return F.pad(x, torch_pads, value=value)


def _check_auto_pad(node: onnx.NodeProto, a: Mapping[str, Any]) -> None:
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise UsageError(f"node {node.name}: auto_pad={auto} is not supported by onnxmorph.train")


def _conv(node, a, x, w, b=None):
    _check_auto_pad(node, a)
    nd = w.dim() - 2
    x = _pad_spatial(x, a.get("pads", [0] * 2 * nd))
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, b, stride=a.get("strides", [1] * nd), dilation=a.get("dilations", [1] * nd),
              groups=a.get("group", 1))


def _gemm(node, a, x, w, c=None):
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if c is not None:
        y = y + a.get("beta", 1.0) * c
    return y


def _pool(node, a, x, kind):
    _check_auto_pad(node, a)
    k = a["kernel_shape"]
    nd = len(k)
    strides = a.get("strides", [1] * nd)
    pads = a.get("pads", [0] * 2 * nd)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        if a.get("dilations", [1] * nd) != [1] * nd or len(node.output) > 1:
            raise UsageError(f"node {node.name}: MaxPool with dilations or indices is not supported")
        x = _pad_spatial(x, pads, value=-math.inf)
        return (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1](x, k, strides, ceil_mode=ceil)
    if a.get("count_include_pad", 0):
        x = _pad_spatial(x, pads)
        return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1](x, k, strides, ceil_mode=ceil)
    if any(pads):
        # Average over the real pixels only: divide the padded sum by the padded count of ones.
        total = _pad_spatial(x, pads)
        ones = _pad_spatial(torch.ones_like(x[:1, :1]), pads)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        return pool(total, k, strides, ceil_mode=ceil) / pool(ones, k, strides, ceil_mode=ceil)
    return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1](x, k, strides, ceil_mode=ceil)


def _softmax(a, x, fn, opset):
    axis = a.get("axis", -1 if opset >= 13 else 1)
    if opset >= 13:
        return fn(x, dim=axis)
    # Before opset 13 the input was coerced to 2-D at `axis`.
    shape = x.shape
    axis = axis % x.dim()
    return fn(x.reshape(int(np.prod(shape[:axis])), -1), dim=1).reshape(shape)


def _reshape(node, a, x, shape):
    dims = [int(d) for d in shape.tolist()]
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _axes(node, a, inputs, opset, attr_until):
    if opset < attr_until:
        return a.get("axes")
    return inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else None


def _squeeze(node, a, inputs, opset):
    axes = _axes(node, a, inputs, opset, 13)
    x = inputs[0]
    if axes is None:
        return x.squeeze()
    for axis in sorted((int(ax) % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(node, a, inputs, opset):
    axes = _axes(node, a, inputs, opset, 13)
    x = inputs[0]
    rank = x.dim() + len(axes)
    for axis in sorted(int(ax) % rank for ax in axes):
        x = x.unsqueeze(axis)
    return x


def _reduce(node, a, inputs, opset, fn, attr_until):
    axes = _axes(node, a, inputs, opset, attr_until)
    keep = bool(a.get("keepdims", 1))
    x = inputs[0]
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return fn(x, dim=[int(ax) for ax in axes], keepdim=keep)


def _clip(node, a, inputs, opset):
    x = inputs[0]
    if opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo = inputs[1] if len(inputs) > 1 else None
        hi = inputs[2] if len(inputs) > 2 else None
    return torch.clamp(x, min=lo, max=hi)


def _batchnorm(node, a, x, scale, bias, mean, var):
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _layernorm(node, a, x, scale, bias=None):
    axis = a.get("axis", -1) % x.dim()
    y = F.layer_norm(x, x.shape[axis:], eps=a.get("epsilon", 1e-5))
    y = y * scale
    return y if bias is None else y + bias


def _gelu(node, a, x):
    approx = a.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return F.gelu(x, approximate=approx)


# op -> function(node, attrs, inputs, opset); inputs may hold None for an omitted optional input.
_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Conv": lambda n, a, i, o: _conv(n, a, *i),
    "Gemm": lambda n, a, i, o: _gemm(n, a, *i),
    "MatMul": lambda n, a, i, o: torch.matmul(i[0], i[1]),
    "Add": lambda n, a, i, o: i[0] + i[1],
    "Sub": lambda n, a, i, o: i[0] - i[1],
    "Mul": lambda n, a, i, o: i[0] * i[1],
    "Div": lambda n, a, i, o: i[0] / i[1],
    "Pow": lambda n, a, i, o: torch.pow(i[0], i[1]),
    "Sum": lambda n, a, i, o: sum(i[1:], i[0]),
    "Neg": lambda n, a, i, o: -i[0],
    "Abs": lambda n, a, i, o: torch.abs(i[0]),
    "Sqrt": lambda n, a, i, o: torch.sqrt(i[0]),
    "Exp": lambda n, a, i, o: torch.exp(i[0]),
    "Log": lambda n, a, i, o: torch.log(i[0]),
    "Erf": lambda n, a, i, o: torch.erf(i[0]),
    "Relu": lambda n, a, i, o: torch.relu(i[0]),
    "PRelu": lambda n, a, i, o: torch.where(i[0] >= 0, i[0], i[0] * i[1]),
    "LeakyRelu": lambda n, a, i, o: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Elu": lambda n, a, i, o: F.elu(i[0], a.get("alpha", 1.0)),
    "Tanh": lambda n, a, i, o: torch.tanh(i[0]),
    "Sigmoid": lambda n, a, i, o: torch.sigmoid(i[0]),
    "Softplus": lambda n, a, i, o: F.softplus(i[0]),
    "Gelu": lambda n, a, i, o: _gelu(n, a, i[0]),
    "Clip": lambda n, a, i, o: _clip(n, a, i, o),
    "Identity": lambda n, a, i, o: i[0],
    "Dropout": lambda n, a, i, o: i[0],  # inference graph: dropout is the identity
    "MaxPool": lambda n, a, i, o: _pool(n, a, i[0], "max"),
    "AveragePool": lambda n, a, i, o: _pool(n, a, i[0], "avg"),
    "GlobalAveragePool": lambda n, a, i, o: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda n, a, i, o: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True),
    "Flatten": lambda n, a, i, o: i[0].reshape(int(np.prod(i[0].shape[: a.get("axis", 1)])), -1),
    "Reshape": lambda n, a, i, o: _reshape(n, a, i[0], i[1]),
    "Transpose": lambda n, a, i, o: i[0].permute(a.get("perm", list(reversed(range(i[0].dim()))))),
    "Concat": lambda n, a, i, o: torch.cat(i, dim=a["axis"]),
    "Squeeze": lambda n, a, i, o: _squeeze(n, a, i, o),
    "Unsqueeze": lambda n, a, i, o: _unsqueeze(n, a, i, o),
    "ReduceMean": lambda n, a, i, o: _reduce(n, a, i, o, torch.mean, 18),
    "ReduceSum": lambda n, a, i, o: _reduce(n, a, i, o, torch.sum, 13),
    "Softmax": lambda n, a, i, o: _softmax(a, i[0], torch.softmax, o),
    "LogSoftmax": lambda n, a, i, o: _softmax(a, i[0], torch.log_softmax, o),
    "LRN": lambda n, a, i, o: F.local_response_norm(i[0], a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75),
                                                    a.get("bias", 1.0)),
    "BatchNormalization": lambda n, a, i, o: _batchnorm(n, a, *i[:5]),
    "LayerNormalization": lambda n, a, i, o: _layernorm(n, a, *i[:3]),
}
# Shape, mask and indexing ops of exported language models (Gather, Where, Trilu, Range, ...);
# their Div also truncates integer division, as ONNX does.
_OPS.update(_TENSOR_OPS)

SUPPORTED_OPS = frozenset(_OPS)

# Inputs that are running statistics, not weights: gradient descent must not move them.
_STATISTICS = {"BatchNormalization": (3, 4)}


# --------------------------------------------------------------------------- the module


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


def _default_trainable(model: onnx.ModelProto) -> Callable[[str], bool]:
    """Every float initializer except single numbers that are not P-activation parameters.

    Single numbers are the constants of exported formulas (GELU's 0.5 and sqrt 2, the attention
    scale, a mask's -inf) and the `1` of a P-activation's `1 - a`: training them would change what
    the graph computes rather than fit its weights.
    """
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    activations = set(_activation_names(model.graph.node, sizes))
    return lambda name: sizes.get(name, 2) > 1 or name in activations


class OnnxModule(torch.nn.Module):
    """An ONNX graph run by torch operators, its float initializers held as `torch.nn.Parameter`s.

    Call it with the graph's true inputs (positionally, in graph order, or by name); it returns
    the single output, or a tuple when the graph has several. Parameters are registered under
    sanitised names; `onnx_names` maps each ONNX initializer name to its parameter.
    """

    def __init__(self, model: onnx.ModelProto, *, trainable: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        model = normalize(model)
        graph = model.graph
        if any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):
            raise UsageError("onnxmorph.train does not run graphs with control flow (If, Loop, Scan)")
        unsupported = sorted({n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")
                              or n.op_type not in _OPS})
        if unsupported:
            raise UsageError(f"onnxmorph.train cannot run op(s) {', '.join(unsupported)}; "
                             f"supported: {', '.join(sorted(_OPS))}")
        self._model = model
        self._opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self._nodes = [(n, _attrs(n)) for n in graph.node]
        self.input_names = [i.name for i in true_inputs(model)]
        self.output_names = [o.name for o in graph.output]
        statistics = {n.input[k] for n in graph.node for k in _STATISTICS.get(n.op_type, ()) if k < len(n.input)}
        if trainable is None:
            trainable = _default_trainable(model)
        self.params = torch.nn.ParameterDict()
        # Constants are non-persistent buffers, so that `module.to(device)` moves them with the weights.
        self._constant_keys: dict[str, str] = {}
        self.onnx_names: dict[str, str] = {}
        taken: set[str] = set()
        for init in graph.initializer:
            array = numpy_helper.to_array(init)
            key = _torch_key(init.name, taken)
            if init.data_type in _FLOAT_TYPES and init.name not in statistics:
                data = torch.from_numpy(np.array(array, dtype=np.float32 if array.dtype == np.float16 else array.dtype))
                self.params[key] = torch.nn.Parameter(data, requires_grad=trainable(init.name))
                self.onnx_names[init.name] = key
            else:
                self.register_buffer("const_" + key, torch.from_numpy(np.array(array)), persistent=False)
                self._constant_keys[init.name] = "const_" + key

    def parameter(self, onnx_name: str) -> torch.nn.Parameter:
        """The parameter holding the ONNX initializer `onnx_name`."""
        try:
            return self.params[self.onnx_names[onnx_name]]
        except KeyError:
            raise UsageError(f"no trainable initializer named {onnx_name!r}") from None

    def onnx_parameters(self) -> dict[str, torch.nn.Parameter]:
        """ONNX initializer name -> parameter, for every float initializer."""
        return {name: self.params[key] for name, key in self.onnx_names.items()}

    @property
    def model(self) -> onnx.ModelProto:
        """The (normalised) ONNX model this module was built from; its weights are the original ones."""
        return self._model

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        env: dict[str, torch.Tensor | None] = {"": None}
        if len(args) > len(self.input_names):
            raise UsageError(f"the model takes {len(self.input_names)} input(s), got {len(args)}")
        env.update(zip(self.input_names, args))
        env.update(kwargs)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise UsageError(f"missing model input(s): {', '.join(missing)}")
        env.update({name: getattr(self, key) for name, key in self._constant_keys.items()})
        env.update({name: self.params[key] for name, key in self.onnx_names.items()})
        for node, attrs in self._nodes:
            inputs = [env[name] for name in node.input]
            result = _OPS[node.op_type](node, attrs, inputs, self._opset)
            if isinstance(result, tuple):
                env.update(zip(node.output, result))
            else:
                env[node.output[0]] = result
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


# --------------------------------------------------------------------------- public API


def to_torch(model: onnx.ModelProto | str, *, trainable: Callable[[str], bool] | None = None) -> OnnxModule:
    """Load an ONNX model (ModelProto or path) as a trainable `OnnxModule`.

    Every float initializer becomes a parameter (BatchNormalization's running mean and variance
    stay constants). By default single numbers are frozen (an exported formula's constants such as
    GELU's 0.5, the `1` of a P-activation's `1 - a`) except P-activation parameters; `trainable(name)`
    replaces that rule.
    """
    if not isinstance(model, onnx.ModelProto):
        from onnxmorph.io.loading import load

        model = load(model)
    return OnnxModule(model, trainable=trainable)


def to_onnx(module: OnnxModule) -> onnx.ModelProto:
    """The module's ONNX model with every initializer replaced by the module's current value.

    The graph, names, opset, metadata and receipt are those of the model the module was built
    from; values are cast back to each initializer's own dtype.
    """
    model = onnx.ModelProto()
    model.CopyFrom(module.model)
    params = module.onnx_parameters()
    for k, init in enumerate(model.graph.initializer):
        if init.name not in params:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        array = params[init.name].detach().cpu().numpy().astype(dtype)
        model.graph.initializer[k].CopyFrom(numpy_helper.from_array(array, init.name))
    return model


def activation_parameters(module: OnnxModule) -> dict[str, torch.nn.Parameter]:
    """The P-activation parameters of a morphed model: ONNX name -> parameter.

    These are the slopes of PRelu nodes and the initializers named with a P-activation suffix
    (`ACTIVATION_SUFFIXES`); at morph time they are 1 (a linear activation), and training moves
    them toward 0 (the plain non-linearity).
    """
    params = module.onnx_parameters()
    names = _activation_names((n for n, _ in module._nodes), module.onnx_names)
    return {name: params[name] for name in names if name in params}


def _loss_function(loss: LossLike) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if callable(loss):
        return loss
    known = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
    if loss not in known:
        raise UsageError(f"unknown loss {loss!r}; use one of {', '.join(known)} or a callable")
    return known[loss]


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))


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


def fit(
    module: torch.nn.Module,
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
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

    `loss` is "cross_entropy", "mse" or a callable(output, target). `optimizer` is an optimiser
    over the module's parameters, or a factory called with its trainable parameters (default:
    Adam, lr 1e-3). Minibatches are drawn from a seeded permutation, reshuffled every epoch, so
    a run is reproducible, and moved to the module's device. `callback(step, loss)` is called after
    each step (step counts from 1). `lr_schedule(step)` multiplies every parameter group's initial
    learning rate at that step. `anneal_activations=N` pulls the P-activations' `a` to 0 over the
    first N steps (see `_Annealer`), so that the layers a morph inserted become non-linear.
    """
    if steps < 0 or batch_size < 1:
        raise UsageError("steps must be >= 0 and batch_size >= 1")
    x, y = _as_tensor(inputs), _as_tensor(targets)
    if len(x) != len(y) or len(x) == 0:
        raise UsageError(f"inputs and targets must be non-empty and of one length, got {len(x)} and {len(y)}")
    loss_fn = _loss_function(loss)
    anneal = _Annealer(module, anneal_activations) if anneal_activations is not None else None
    optimizer = _make_optimizer(module, optimizer)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(x))
    order = torch.randperm(len(x), generator=generator)
    position = 0
    losses: list[float] = []
    module.train()
    for step in range(1, steps + 1):
        if position + batch_size > len(x):
            order, position = torch.randperm(len(x), generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        if lr_schedule is not None:
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_schedule(step)
        optimizer.zero_grad()
        value = loss_fn(module(x[index].to(device)), y[index].to(device))
        value.backward()
        optimizer.step()
        if anneal is not None:
            anneal(step)
        losses.append(float(value.detach()))
        if callback is not None:
            callback(step, losses[-1])
    module.eval()
    return losses


def predict(module: torch.nn.Module, inputs: np.ndarray | torch.Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """The module's (first) output on `inputs`, computed in batches without gradients."""
    x = _as_tensor(inputs)
    if len(x) == 0:
        raise UsageError("no inputs")
    outputs = []
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = module(x[start:start + batch_size].to(device))
            outputs.append((out[0] if isinstance(out, tuple) else out).cpu().numpy())
    return np.concatenate(outputs)

