"""Which ONNX initializer holds which Hugging Face parameter: the parent's by value, the child's by following names.

Exporters keep some parameter names (dynamo most of them) and rename or transpose others
(TorchScript's `onnx::MatMul_123` is a Linear weight transposed; Gemma's norms are exported as
1 + weight, folded into one constant). Names are not trusted alone: every checkpoint tensor is
matched BY VALUE to the parent export's initializers, exactly as stored, transposed, or plus one;
names and the exporter's module scopes only choose between initializers of equal value. The
child's weight of a parameter is then the initializer of the same name (morphs keep the names of
the weights they grow), or its copy under `<block>/morph_block/` in a block that `block` inserted.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmorph.errors import NotApplicable
from onnxmorph.hf.families import Family
from onnxmorph.io import streaming

FORMS = ("same", "transposed", "plus_one")
# A copy made by the block morph: "<module>/morph_block[_k]/<name of the weight it copies>".
_COPY = re.compile(r"/morph_block(?:_\d+)?/")
_TABLE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")


@dataclass(frozen=True)
class Source:
    """A parameter's initializer in an export and how it is stored there."""

    init: str
    form: str  # "same", "transposed" (a Linear weight as a MatMul reads it), "plus_one" (Gemma's 1 + weight)


def is_float(values: np.ndarray) -> bool:
    """A floating-point tensor (bfloat16, an ml_dtypes type, included): what growth changes."""
    return values.dtype.kind == "f" or values.dtype.name == "bfloat16"


def array(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of an initializer (memory-mapped when it stays in its file)."""
    return streaming.map_array(tensor) if streaming.is_reference(tensor) else numpy_helper.to_array(tensor)


def to_export(values: np.ndarray, form: str) -> np.ndarray:
    """A parameter as the export stores it in `form` (float32)."""
    values = np.asarray(values, dtype=np.float32)
    if form == "transposed":
        return values.T
    if form == "plus_one":
        return values + np.float32(1)
    return values


def from_export(values: np.ndarray, form: str) -> np.ndarray:
    """The parameter that an export's array in `form` holds (float32)."""
    values = np.asarray(values, dtype=np.float32)
    if form == "transposed":
        return np.ascontiguousarray(values.T)
    if form == "plus_one":
        return values - np.float32(1)
    return values


def _fingerprint(values: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    contiguous = np.ascontiguousarray(values, dtype=np.float32)
    return contiguous.shape, hashlib.blake2b(contiguous.tobytes(), digest_size=20).digest()


def origin(name: str) -> str:
    """The parent initializer that a child initializer is, or copies (block copies name it last)."""
    return _COPY.split(name)[-1]


def is_copy(name: str) -> bool:
    return _COPY.search(name) is not None


def consumers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Initializer name -> the (node, input index) pairs that read it."""
    names = {t.name for t in model.graph.initializer}
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in names:
                found[name].append((node, k))
    return found


def _is_table(reads: Iterable[tuple[onnx.NodeProto, int]]) -> bool:
    """Read as a layer's weight or an embedding table (what a checkpoint must hold)."""
    return any(node.op_type in _TABLE_OPS and (k == 1 if node.op_type != "Gather" else k == 0)
               for node, k in reads)


def _evidence(key: str, init: str, reads: Iterable[tuple[onnx.NodeProto, int]]) -> int:
    """How strongly names say that `init` is parameter `key`: 2 by its own name, 1 by its readers' module scope."""
    if init == key or init.endswith("." + key):
        return 2
    module = "/" + key.rsplit(".", 1)[0].replace(".", "/") + "/"
    return 1 if any(module in node.name for node, _ in reads) else 0


@dataclass
class ParentMap:
    """Checkpoint parameter -> its initializer(s) in the parent export (several only when they are equal in value)."""

    sources: dict[str, list[Source]]
    kept: list[str] = field(default_factory=list)  # integer buffers a checkpoint may hold: written as they are
    heads: dict[str, list[Source]] = field(default_factory=dict)  # tied target -> the export's own copy of it

    def layer_sources(self, family: Family) -> dict[str, set[int]]:
        """Initializer -> the blocks whose parameters it holds."""
        found: dict[str, set[int]] = defaultdict(set)
        for key, sources in self.sources.items():
            match = family.layer_match(key)
            if match:
                for s in sources:
                    found[s.init].add(match[0])
        return found


def match_parent(parent: onnx.ModelProto, tensors: Mapping[str, np.ndarray], family: Family, tied: bool,
                 where: str, like: str) -> ParentMap:
    """Match every checkpoint tensor to the parent export's initializers by value; NotApplicable when one is missing.

    With `tied` (tie_word_embeddings), the token embedding is also the output head: the initializer the
    head reads (through a MatMul or Gemm, often a transposed copy) is kept apart as the tied target's.
    """
    reads = consumers(parent)
    index: dict[tuple[tuple[int, ...], bytes], list[str]] = defaultdict(list)
    for tensor in parent.graph.initializer:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                                onnx.TensorProto.DOUBLE) and tensor.name in reads:
            index[_fingerprint(array(tensor))].append(tensor.name)
    sources: dict[str, list[Source]] = {}
    heads: dict[str, list[Source]] = {}
    tied_targets = {source: target for target, source in family.tied.items()} if tied else {}
    kept = []
    for key, values in tensors.items():
        if not is_float(values):
            kept.append(key)
            continue
        found = []
        for form in FORMS:
            if form == "transposed" and values.ndim != 2 or form == "plus_one" and values.ndim != 1:
                continue
            found += [Source(init, form) for init in index.get(_fingerprint(to_export(values, form)), [])]
        if not found:
            raise NotApplicable(f"{like}: parameter {key} {list(values.shape)} is in no initializer of {where}: that "
                                "model is not an export of this checkpoint")
        if key in tied_targets and values.ndim == 2:
            own = [s for s in found if any(n.op_type == "Gather" for n, _ in reads[s.init])]
            other = [s for s in found if any(n.op_type != "Gather" for n, _ in reads[s.init])]
            if own and other:
                heads[tied_targets[key]] = _prefer(tied_targets[key], other, reads)
                found = own
        sources[key] = _prefer(key, found, reads)
    matched = {s.init for group in (*sources.values(), *heads.values()) for s in group}
    for tensor in parent.graph.initializer:
        if tensor.name not in matched and tensor.name in reads and len(tensor.dims) >= 2 and _is_table(
                reads[tensor.name]) and tensor.data_type != onnx.TensorProto.INT64:
            node = reads[tensor.name][0][0]
            raise NotApplicable(f"{where}: weight '{tensor.name}' {list(tensor.dims)} (read by {node.op_type} "
                                f"'{node.name}') matches no parameter of {like}: not an export of that checkpoint")
    return ParentMap(sources, heads=heads, kept=kept)


def _prefer(key: str, found: list[Source], reads: Mapping[str, list[tuple[onnx.NodeProto, int]]]) -> list[Source]:
    """The candidates that names point to most strongly (all of them when names say nothing)."""
    unique = list(dict.fromkeys(found))
    scores = [_evidence(key, s.init, reads.get(s.init, [])) for s in unique]
    best = max(scores)
    return [s for s, score in zip(unique, scores) if score == best]
