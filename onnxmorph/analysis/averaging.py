"""Growing a normalised stream (a transformer's hidden width) exactly: tiling, or average expansion at other widths.

Tiling (a width k times the old one): every channel gets k-1 copies, so each norm over the stream
sees the copy's statistics. At any other width N > D the stream becomes q = floor(N/D) copies and
N - qD extra channels, the variance or mean square then scales by s = qD/N, and each norm is kept
exact by rescaling its epsilon by s and its weight by sqrt(s):

* LayerNorm (fused): the extra channels carry the mean of the stream (source -1), so the mean is
  unchanged; they come out as beta and are read with weight 0. Every op on the stream must keep
  "a channel equal to the mean of the others" (linear, channel-blind) and the norm's output must
  only be read by layers (pre-norm).
* RMSNorm (fused or decomposed as `x * 1/sqrt(mean(x^2) + eps) * w`): the extra channels are 0
  (source -2), which every op on the stream must keep 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxmorph.analysis import channels
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph

MEAN_NORMS = ("LayerNormalization", "SkipLayerNormalization")
RMS_NORMS = ("RMSNormalization", "SkipSimplifiedLayerNormalization")
# ops that keep "a new channel is the mean of the old ones": linear and channel-blind
MEAN_OPS = {"Add", "Sub", "Mul", "Div", "Identity", "Dropout", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
            "Transpose", "Gather", "Concat", "Slice", "Split", "Expand", "Tile", "MatMul", "Gemm", "Conv", "Shape",
            *MEAN_NORMS}  # Shape reads only the size (what it shapes is checked by its rule)


@dataclass
class Average:
    """How a stream is averaged: the scale s, zero (RMS) or mean (LayerNorm) extra channels, what to rescale."""

    scale: float
    zero: bool
    epsilon_attrs: list[str] = field(default_factory=list)  # fused norms whose epsilon attribute scales by s
    epsilon_inputs: list[tuple[str, int]] = field(default_factory=list)  # decomposed: the constant added
    weights: set[tuple[str, int]] = field(default_factory=set)  # decomposed RMSNorm weights: times sqrt(s)


def _single_reader(tensor: gs.Tensor, ops: tuple[str, ...]) -> gs.Node | None:
    readers = [n for n in tensor.outputs if n.op in ops]
    return readers[0] if len(readers) == 1 else None


def decomposed_rms(reduce: gs.Node) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """(epsilon constant, weight constant) of `x * 1/sqrt(mean(x^2) + eps) * w` around ReduceMean `reduce`."""
    pow_node = reduce.inputs[0].inputs[0] if reduce.inputs[0].inputs else None
    add = _single_reader(reduce.outputs[0], ("Add",))
    if pow_node is None or pow_node.op != "Pow" or add is None:
        return None
    eps = [k for k, t in enumerate(add.inputs) if isinstance(t, gs.Constant) and t.values.size == 1]
    chain = add.outputs[0]
    for ops in (("Sqrt",), ("Reciprocal", "Div")):  # 1/sqrt as Reciprocal or as Div(1, sqrt)
        node = _single_reader(chain, ops)
        if node is not None and (node.op != "Div" or node.inputs[1] is chain and isinstance(node.inputs[0],
                                                                                              gs.Constant)):
            chain = node.outputs[0]
    x = pow_node.inputs[0]
    # x * (1/sqrt(...)) or x / sqrt(...)
    scaled = [n for n in x.outputs if n.op in ("Mul", "Div") and chain in n.inputs and n is not pow_node]
    if not eps or len(scaled) != 1:
        return None
    normed = scaled[0].outputs[0]
    while len(normed.outputs) == 1 and normed.outputs[0].op in ("Cast", "Identity"):  # back to the input's type
        normed = normed.outputs[0].outputs[0]
    weight = _single_reader(normed, ("Mul",))
    if weight is None:
        return None
    index = [k for k, t in enumerate(weight.inputs) if isinstance(t, gs.Constant) and t.values.size > 1]
    return ((add.name, eps[0]), (weight.name, index[0])) if index else None


def plan_average(view: gs.Graph, coupling: channels.Coupling, old: int, width: int, tiled: str) -> Average:
    """Average expansion of the widened stream to `width`, or NotApplicable saying why (`tiled` opens it)."""
    why = f"{tiled} (--width a multiple of {old})"
    norms = [mgraph.find_node(view, name) for name in coupling.uniform]
    zero = all(n.op in RMS_NORMS or n.op == "ReduceMean" for n in norms)
    plan = Average((width // old) * old / width, zero)
    for node in norms:
        if node.op in MEAN_NORMS + RMS_NORMS and (node.op in RMS_NORMS) == zero:
            plan.epsilon_attrs.append(node.name)
            if not zero and not _read_by_layers_only(node.outputs[0]):
                raise NotApplicable(f"{why}: the output of {node.op} '{node.name}' is not only read by layers "
                                    "(post-norm), so its mean channels would not stay means")
            continue
        parts = decomposed_rms(node) if zero and node.op == "ReduceMean" else None
        if parts is None:
            raise NotApplicable(f"{why}: {node.op} '{node.name}' is neither a LayerNorm nor an RMSNorm whose "
                                "epsilon and weight average expansion can rescale")
        plan.epsilon_inputs.append(parts[0])
        plan.weights.add(parts[1])
    if zero:
        blockers = coupling.zero_blockers.get(0, [])
        if blockers:
            raise NotApplicable(f"{why}: '{blockers[0]}' does not keep the new channels 0, as average expansion of "
                                "an RMS-normalised stream needs")
        return plan
    roles = {(p.node, p.role) for p in coupling.params}
    for name in coupling.touched:
        node = mgraph.find_node(view, name)
        scaled = any(n == name and r not in ("shift", "norm-scale") for n, r in roles)
        if node.op not in MEAN_OPS or scaled or int(node.attrs.get("group", 1)) > 1:
            raise NotApplicable(f"{why}: {node.op} '{name}' does not keep a channel that is the mean of the others, "
                                "as average expansion needs")
    return plan


def _read_by_layers_only(tensor: gs.Tensor) -> bool:
    """Whether `tensor` reaches only layers (through reshapes): a pre-norm LayerNorm's output, not the stream."""
    stack = [tensor]
    while stack:
        for node in stack.pop().outputs:
            # through reshapes, and picks of other axes (a classifier reading the class token)
            if node.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Gather",
                           "Slice"):
                stack.append(node.outputs[0])
            elif node.op == "Shape":
                continue  # reads the size only (what it shapes is checked by the Shape rule)
            elif node.op not in channels.LAYERS:
                return False
    return True
