"""The kernel-size morph: grow a Conv's kernel by zero-padding it and raising the conv's padding."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxmorph.contract.passinfra import MorphPass, Param, PassResult, dims, layer_name, layer_weight
from onnxmorph.contract.registry import register
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph
from onnxmorph.graph import layers
from onnxmorph.graph.core import LayerInfo
from onnxmorph.numerics.geometry import ConvGeometry, kernel_offsets, resized_geometry, shown

log = logging.getLogger("onnxmorph")


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
        Param("layer", layer_name, "the Conv layer: node name, output name or module "
              "path, as inspect prints them", metavar="L"),
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
        layer = layers.read_layer(model, self.layer, ("Conv",))
        assert layer.geometry is not None
        size = layer.expand_kernel(self.size, "--size")
        old = layer.kernel
        if size == old:
            raise NotApplicable(f"{layer.label}: the kernel is already {shown(old)}")
        shrinking = any(n < o for o, n in zip(old, size))
        if shrinking:
            if not removed_ring_is_zero(layer.weight, size):
                raise NotApplicable(f"{layer.label}: shrinking the {shown(old)} kernel to {shown(size)} would drop "
                                    "non-zero taps (not function-preserving)")
            if min(resized_geometry(layer.geometry, size).pads) < 0:
                raise NotApplicable(f"{layer.label}: shrinking to {shown(size)} would need negative padding "
                                    f"(pads {layer.geometry.pads})")
        return layer.geometry, size, shrinking

    def requires(self, model: mgraph.ModelOrAnalysis) -> tuple[ConvGeometry, tuple[int, ...], bool]:
        return self._plan(mgraph.analysis(model))

    def describe(self, plan: tuple[ConvGeometry, tuple[int, ...], bool]) -> dict[str, Any]:
        geometry, size, _ = plan
        return {"kernel": shown(geometry.kernel) + " (grows to any larger size)"}

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
                self.layer, shown(geometry.kernel), shown(size),
            )
        return PassResult(mgraph.export_model(graph, like=model), True)
