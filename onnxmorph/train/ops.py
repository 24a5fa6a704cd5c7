"""The ops onnxmorph.train runs: which function runs a node (the variant of the model's opset), or why none does.

The functions are in the modules of their kind, registered in `onnxmorph.train.optable`; importing
this module loads them all. `check_graph` refuses a graph in one line that says what to do instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from onnxmorph.errors import UsageError
from onnxmorph.train import ops_attention, ops_elementwise, ops_nn, ops_norm, ops_reduce, ops_shape  # noqa: F401
from onnxmorph.train.optable import Call, Variant, registered, torch_dtype, variants

__all__ = ["SUPPORTED_OPS", "Call", "Variant", "check_graph", "resolve", "supported_ops", "torch_dtype"]

ONNX_DOMAINS = ("", "ai.onnx")

CONTROL_FLOW = ("If", "Loop", "Scan", "SequenceMap")

# Why an op family cannot be trained, and what to do instead (checked before the op table).
_ADVICE: dict[str, str] = {
    **{name: "control flow runs a subgraph per branch or iteration, which onnxmorph.train does not interpret; "
       "export the model so that the branch is traced for your inputs (torch.onnx.export of a traced module "
       "with dynamo=False, or dynamo=True without torch.cond; a Hugging Face model with use_cache=False)"
       for name in CONTROL_FLOW},
    **{name: "a quantized graph has integer weights that gradients cannot move; train the float model, "
       "then quantize it" for name in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                                         "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger")},
    **{name: "random ops make every run different; export the model in eval mode (model.eval())"
       for name in ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                    "Multinomial")},
    **{name: "sequence-typed values are not supported; export with dynamo=True, which writes fixed-size "
       "Split/Concat instead" for name in ("SequenceConstruct", "SequenceAt", "SequenceInsert", "SequenceEmpty",
                                            "SequenceLength", "SplitToSequence", "ConcatFromSequence",
                                            "SequenceErase", "Optional", "OptionalGetElement", "OptionalHasElement")},
}


def supported_ops() -> list[str]:
    """Every op the table runs, as "op" for the ONNX domain and "domain:op" otherwise."""
    return sorted(name if not domain else f"{domain}:{name}" for domain, name in registered())


SUPPORTED_OPS = frozenset(supported_ops())


def _label(node: onnx.NodeProto) -> str:
    domain = node.domain if node.domain not in ONNX_DOMAINS else ""
    return f"{domain}:{node.op_type}" if domain else node.op_type


def _advice(node: onnx.NodeProto, opset: int) -> str | None:
    """Why `node` cannot run (None when it can)."""
    domain = "" if node.domain in ONNX_DOMAINS else node.domain
    if node.op_type in _ADVICE and domain == "":
        return _ADVICE[node.op_type]
    found = variants(domain, node.op_type)
    if found:
        if opset < found[0].since:
            return (f"onnxmorph.train runs {node.op_type} from opset {found[0].since}, the model is at opset "
                    f"{opset}; convert it first: onnx.version_converter.convert_version(model, 17)")
        return None
    if domain == "com.microsoft":
        return ("an onnxruntime contrib op (written by onnxruntime.transformers' optimizer or a fused export); "
                "train the model as torch.onnx.export wrote it, before optimizing it for inference")
    if domain:
        return f"ops of domain '{domain}' are not ONNX ops; export the model with standard ONNX ops only"
    return ("not among the ops onnxmorph.train runs (see docs/training.md); the Hugging Face families of "
            "tests/hf_support.py export without it with torch.onnx.export(..., dynamo=True) or dynamo=False")


def check_graph(nodes: Iterable[onnx.NodeProto], opset: int, functions: set[tuple[str, str]] = frozenset()) -> None:
    """Refuse, in one line, a graph with a node that onnxmorph.train cannot run: the first such op, the nodes
    of every such op, and what to do."""
    refused: dict[str, tuple[str, list[str]]] = {}
    for node in nodes:
        if (node.domain, node.op_type) in functions:
            continue  # a model-local function: inlined, then its nodes are checked
        why = _advice(node, opset)
        if why is None:
            variant = resolve(node, opset)
            extra = [k for k in range(variant.outputs, len(node.output)) if node.output[k]]
            if not extra:
                continue
            why = f"output {extra[0]} ({node.output[extra[0]]}) is not supported; use its first {variant.outputs}"
        label = _label(node)
        refused.setdefault(label, (why, []))[1].append(node.name or node.output[0])
    if refused:
        label, (why, names) = next(iter(refused.items()))
        more = f" (also {', '.join(sorted(set(refused) - {label}))})" if len(refused) > 1 else ""
        where = f"node '{names[0]}'" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        raise UsageError(f"onnxmorph.train cannot run {label} ({where}): {why}{more}")


def resolve(node: onnx.NodeProto, opset: int) -> Variant:
    """The variant of `node`'s op for `opset` (the latest one registered at or below it)."""
    domain = "" if node.domain in ONNX_DOMAINS else node.domain
    found = [v for v in variants(domain, node.op_type) if v.since <= opset]
    if not found:
        raise UsageError(f"onnxmorph.train cannot run {_label(node)} at opset {opset}")
    return found[-1]
