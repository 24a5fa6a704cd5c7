"""The kernel-size morph: grow a Conv's kernel by zero-padding it and raising the conv's padding."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxmorph import graph as mgraph
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import ConvGeometry, LayerInfo
from onnxmorph.passinfra import MorphPass, Param, PassResult, dims, layer_name, layer_weight, register

log = logging.getLogger("onnxmorph")


def kernel_offsets(old: Sequence[int], new: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per axis, taps added before (`lo`) and after (`hi`): `lo = (K' - K) // 2`, `hi` the rest.

    Negative values mean taps removed (a shrink); an odd difference puts the extra tap after.
    """
    lo = tuple((n - o) // 2 for o, n in zip(old, new))
    hi = tuple((n - o) - a for o, n, a in zip(old, new, lo))
    return lo, hi


def resize_kernel(w: np.ndarray, new: Sequence[int]) -> np.ndarray:
    """Filter `w` `[Co, Ci/g, *K]` zero-padded (or cropped) to kernel `new`, placed per `kernel_offsets`.

    Cropping is only function-preserving when the removed ring is zero; the caller checks
    that with `removed_ring_is_zero`.
    """
    old = w.shape[2:]
    lo, hi = kernel_offsets(old, new)
    grown = np.pad(w, [(0, 0), (0, 0)] + [(max(a, 0), max(b, 0)) for a, b in zip(lo, hi)])
    window = tuple(slice(max(-a, 0), max(-a, 0) + n) for a, n in zip(lo, new))
    return np.ascontiguousarray(grown[(slice(None), slice(None), *window)])


def removed_ring_is_zero(w: np.ndarray, new: Sequence[int]) -> bool:
    """True when every tap that `resize_kernel(w, new)` drops is zero."""
    # Cropping only removes entries, so equal non-zero counts mean nothing non-zero was removed.
    return int(np.count_nonzero(resize_kernel(w, new))) == int(np.count_nonzero(w))


def resized_geometry(geometry: ConvGeometry, new: Sequence[int]) -> ConvGeometry:
    """The conv geometry that keeps every output after the kernel becomes `new` (pads move by dilation*taps)."""
    lo, hi = kernel_offsets(geometry.kernel, new)
    begin = tuple(p + d * a for p, d, a in zip(geometry.pads_begin, geometry.dilations, lo))
    end = tuple(p + d * b for p, d, b in zip(geometry.pads_end, geometry.dilations, hi))
    return ConvGeometry(tuple(new), begin, end, geometry.strides, geometry.dilations, geometry.group)


@register
class KernelPass(MorphPass):
    """Grow the kernel of a Conv (1-D, 2-D or 3-D) to a larger size, keeping its function exactly.

    The kernel is zero-padded by (K' - K) // 2 taps before and the rest after on each axis, and
    the conv's padding grows by the same number of taps times the dilation, so every output
    (border included) sees the same inputs with the same weights. auto_pad becomes explicit pads.
    Shrinking is refused unless the removed outer ring of the kernel is all zero.
    """

    name = "kernel"
    summary = "grow a Conv's kernel (zero-padded kernel, larger padding)"
    params = (
        Param("layer", layer_name, "the Conv layer (node or output name)", metavar="L"),
        Param("size", dims, "new kernel size, one number for every axis or one per axis (5, 1x7)",
              metavar="K"),
    )

    def new_weights(self, model: onnx.ModelProto) -> tuple[int, int]:
        found = layer_weight(model, self.layer)
        if found is None or len(found[0]) < 3:
            return 0, 0
        (co, ci, *kernel), itemsize = found
        size = list(self.size) * len(kernel) if len(self.size) == 1 else list(self.size)
        return co * ci * math.prod(size) * itemsize, 0

    @classmethod
    def probe(cls, model: onnx.ModelProto, layer: LayerInfo) -> MorphPass | None:
        if layer.op != "Conv" or len(layer.weight_shape) < 3:
            return None
        return cls(layer=layer.name, size=[k + 2 for k in layer.weight_shape[2:]])

    def _plan(self, model: mgraph.Analysis) -> tuple[ConvGeometry, tuple[int, ...], bool]:
        view = mgraph.read_view(model)
        node = mgraph.find_layer(view, self.layer, ("Conv",))
        mgraph.exclusive_constant(node, 1)
        w = mgraph.values(node.inputs[1])
        nd = w.ndim - 2
        if nd < 1:
            raise NotApplicable(f"layer '{self.layer}': its weight {list(w.shape)} has no spatial axes")
        size = tuple(self.size) * nd if len(self.size) == 1 else tuple(self.size)
        if len(size) != nd:
            raise NotApplicable(
                f"layer '{self.layer}': --size {'x'.join(map(str, self.size))} has {len(size)} axes, "
                f"the kernel has {nd} ({'x'.join(map(str, w.shape[2:]))})"
            )
        if w.dtype.kind != "f":
            raise NotApplicable(f"layer '{self.layer}': weight type {w.dtype} is not a float type")
        geometry = mgraph.conv_geometry(node, mgraph.tensor_shapes(model))
        if tuple(w.shape[2:]) != geometry.kernel:
            raise NotApplicable(
                f"layer '{self.layer}': kernel_shape {list(geometry.kernel)} differs from its weight "
                f"{list(w.shape)}"
            )
        old = geometry.kernel
        shown = "x".join(map(str, old))
        if size == old:
            raise NotApplicable(f"layer '{self.layer}': the kernel is already {shown}")
        shrinking = any(n < o for o, n in zip(old, size))
        if shrinking:
            if not removed_ring_is_zero(w, size):
                raise NotApplicable(
                    f"layer '{self.layer}': shrinking the {shown} kernel to {'x'.join(map(str, size))} "
                    "would drop non-zero taps (not function-preserving)"
                )
            new = resized_geometry(geometry, size)
            if min(new.pads) < 0:
                raise NotApplicable(
                    f"layer '{self.layer}': shrinking to {'x'.join(map(str, size))} would need negative "
                    f"padding (pads {geometry.pads})"
                )
        return geometry, size, shrinking

    def requires(self, model: mgraph.ModelOrAnalysis) -> tuple[ConvGeometry, tuple[int, ...], bool]:
        return self._plan(mgraph.analysis(model))

    def describe(self, plan: tuple[ConvGeometry, tuple[int, ...], bool]) -> dict[str, Any]:
        geometry, size, _ = plan
        return {"kernel": "x".join(map(str, geometry.kernel)) + " (grows to any larger size)"}

    def call(self, model: mgraph.ModelOrAnalysis, plan: tuple[ConvGeometry, tuple[int, ...], bool]) -> PassResult:
        model = mgraph.model_of(model)
        geometry, size, shrinking = plan
        graph = mgraph.import_graph(model)
        node = mgraph.find_layer(graph, self.layer, ("Conv",))
        w = mgraph.values(node.inputs[1])
        mgraph.set_input_constant(node, 1, resize_kernel(w, size))
        mgraph.set_conv_geometry(node, resized_geometry(geometry, size))
        if shrinking:
            log.warning(
                "kernel: shrinking '%s' from %s to %s is exact only because the removed outer taps are all zero",
                self.layer, "x".join(map(str, geometry.kernel)), "x".join(map(str, size)),
            )
        return PassResult(mgraph.export_model(graph, like=model), True)
