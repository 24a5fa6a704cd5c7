"""The depth morph: one Conv, Gemm or MatMul layer becomes two that compose to it, a P-activation between."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxmorph.contract.passinfra import (
    SEED,
    MorphPass,
    Param,
    PassResult,
    dims,
    layer_name,
    new_layer_bytes,
    positive_int,
)
from onnxmorph.contract.registry import register
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import build, layers
from onnxmorph.graph import core as mgraph
from onnxmorph.graph.core import LayerInfo
from onnxmorph.graph.layers import Layer
from onnxmorph.numerics import solvers
from onnxmorph.numerics.geometry import pair_geometries, shown

log = logging.getLogger("onnxmorph")

DEEPEN_OPS = layers.SOLVABLE_OPS
METHODS = ("netmorph", "identity")
DEFAULT_CONV_KERNEL = 3


@dataclass(frozen=True)
class DeepenPlan:
    """Everything `call` needs, decided by `requires`: the parent layer and the new geometry.

    `k2` is the new second layer's kernel (`()` for Gemm/MatMul); `solution` is filled by
    `requires` when only solving tells whether an exact split exists.
    """

    layer: Layer
    k2: tuple[int, ...]
    width: int
    solution: solvers.DepthSolution | None = None

    @property
    def exact_by_counting(self) -> bool:
        """The paper's sufficient condition for Algorithm 1 at full kernel sizes (per group)."""
        layer = self.layer
        co_g, ci_g, cm_g = layer.out_channels // layer.groups, layer.in_channels, self.width // layer.groups
        k = layer.kernel
        composite = math.prod(a + b - 1 for a, b in zip(k, self.k2))
        return max(cm_g * ci_g * math.prod(k), co_g * cm_g * math.prod(self.k2)) >= co_g * ci_g * composite


@register
class DeepenPass(MorphPass):
    """Replace layer L by two layers (Conv -> Conv, Gemm -> Gemm, MatMul -> MatMul) computing exactly L.

    `netmorph` (default) is the paper's dense solution: Algorithm 1 when the exactness condition
    holds, else Algorithm 2 (one factor's kernel shrunk until exact, zero-padded back); `identity`
    is IdMorph / Net2DeeperNet (layer 2 is the identity). Between the two sits a P-activation that
    is the identity at morph time; the activation that followed L stays after the pair. Conv: layer 1
    keeps L's kernel, dilation and groups, gets stride 1 and all the padding (P + dilation * lo before,
    P + dilation * hi after, lo = (K2-1)//2); layer 2 gets kernel K2, pads 0, L's stride, dilation and
    groups: exact on every output pixel, border included. Layer 1's bias is zero, layer 2 keeps L's
    bias. Gemm: alpha goes into the weights, a constant C becomes beta*C on layer 2, transA stays on
    layer 1. MatMul: a following Add (bias) stays after the pair. `--kernel` is for Conv only; for
    Gemm/MatMul it must be left out or be 1.
    """

    name = "deepen"
    summary = "replace a layer by two layers (dense NetMorph or identity) with a P-activation between"
    params = (
        Param("layer", layer_name, "the Conv, Gemm or MatMul layer: node name, output name or module "
              "path, as inspect prints them", metavar="L"),
        Param("kernel", dims, "kernel of the new second layer, one number or one per axis (Conv only; "
              f"default {DEFAULT_CONV_KERNEL}, Gemm/MatMul: 1)", default=None, metavar="K"),
        Param("width", positive_int, "channels between the two layers (default: the layer's output channels)",
              default=None, metavar="C"),
        Param("activation", str, "P-activation between the layers, the identity at morph time", default="relu",
              choices=build.ACTIVATIONS),
        Param("method", str, "netmorph (dense, the paper's) or identity (IdMorph / Net2DeeperNet)",
              default="netmorph", choices=METHODS),
        SEED,
    )

    @classmethod
    def probe(cls, model: onnx.ModelProto, layer: LayerInfo) -> MorphPass | None:
        if layer.op not in DEEPEN_OPS and layer.op != "ConvTranspose":
            return None
        return cls(layer=layer.name)

    # ------------------------------------------------------------------ checks

    def _plan(self, model: mgraph.Analysis) -> DeepenPlan:
        layer = layers.read_layer(model, self.layer, DEEPEN_OPS)
        problem = build.activation_problem(self.activation, layer.opset, layer.dtype)
        if problem is not None:
            raise NotApplicable(f"{layer.label}: {problem}")
        if layer.op == "Conv":
            k2 = layer.expand_kernel(self.kernel or (DEFAULT_CONV_KERNEL,), "--kernel")
        elif self.kernel is not None and any(k != 1 for k in self.kernel):
            raise NotApplicable(f"{layer.label}: --kernel {shown(tuple(self.kernel))} is for Conv layers; a "
                                f"{layer.op} has no kernel (leave --kernel out or give 1)")
        else:
            k2 = ()
        layer.check_finite()
        plan = DeepenPlan(layer, k2, self.width or layer.out_channels)
        if plan.width % layer.groups:
            raise NotApplicable(f"{layer.label}: --width {plan.width} is not a multiple of its {layer.groups} groups")
        if self.method == "identity" and plan.width < layer.out_channels:
            raise NotApplicable(
                f"{layer.label}: identity deepening needs --width >= its {layer.out_channels} output channels, "
                f"got {plan.width}"
            )
        return plan

    def solve(self, plan: DeepenPlan) -> solvers.DepthSolution:
        """The two factors of the planned split (the plan's own when `requires` already solved)."""
        if plan.solution is not None:
            return plan.solution
        return solvers.solve_deepen(plan.layer.canonical(), plan.k2, plan.width, np.random.default_rng(self.seed),
                                    groups=plan.layer.groups, method=self.method)

    def new_weights(self, model: onnx.ModelProto) -> tuple[int, int]:
        return new_layer_bytes(model, self.layer, self.width, self.kernel), 1

    def requires(self, model: mgraph.ModelOrAnalysis) -> DeepenPlan:
        plan = self._plan(mgraph.analysis(model))
        # With width >= C_out per group an exact solution always exists (the 1x1 limit of Algorithm 2,
        # or the identity); narrower widths may have none, and only solving tells: then the plan
        # carries the solution, and call() does not solve again. A solver error in call() is a bug.
        if plan.width // plan.layer.groups < plan.layer.out_channels // plan.layer.groups:
            try:
                plan = dataclasses.replace(plan, solution=self.solve(plan))
            except ValueError as exc:
                raise NotApplicable(f"layer '{self.layer}': {str(exc).splitlines()[0]}") from exc
        return plan

    def describe(self, plan: DeepenPlan) -> dict[str, Any]:
        facts: dict[str, Any] = {"method": self.method, "width": plan.width}
        if plan.layer.op == "Conv":
            facts["kernel"] = f"{shown(plan.layer.kernel)} then {shown(plan.k2)}"
        if self.method == "netmorph":
            facts["algorithm"] = ("1 (exact by counting)" if plan.exact_by_counting
                                  else "2 (shrinks one factor's kernel)")
        facts["activation"] = self.activation
        return facts

    # ------------------------------------------------------------------ rewrite

    def call(self, model: mgraph.ModelOrAnalysis, plan: DeepenPlan) -> PassResult:
        model = mgraph.model_of(model)
        solution = self.solve(plan)
        log.info("deepen '%s': %s, residual %.1e", self.layer, solution.algorithm, solution.residual)
        graph = mgraph.import_graph(model)
        old = layers.detach(graph, plan.layer)
        namer = mgraph.Namer(graph)
        scope = old.scope(namer, "morph_deepen")
        layer = plan.layer
        tag = layer.op.lower()
        build.insert_layer_pair(
            graph, namer, scope, old.x, old.y, *self._specs(plan, solution, old), activation=self.activation,
            channel_axis=layer.channel_axis, rank=layer.rank, dtype=layer.dtype, opset=layer.opset,
            tags=(f"{tag}_a", f"{tag}_b"),
        )
        return PassResult(mgraph.export_model(graph, like=model), True)

    @staticmethod
    def _specs(plan: DeepenPlan, solution: solvers.DepthSolution,
               old: layers.Detached) -> tuple[build.LayerSpec, build.LayerSpec]:
        # Layer 1's bias is zero, so layer 2 keeps the parent's bias unchanged (carry_bias with b1 = 0).
        zero_bias = np.zeros(plan.width)
        layer = plan.layer
        if layer.op == "Conv":
            assert layer.geometry is not None
            g1, g2 = pair_geometries(layer.geometry, plan.k2)
            return (build.LayerSpec("Conv", solution.f1, zero_bias, g1),
                    build.LayerSpec("Conv", solution.f2, old.bias, g2))
        if layer.op == "Gemm":
            return (build.LayerSpec("Gemm", solution.f1, zero_bias, trans_a=layer.trans_a, trans_b=layer.trans_b),
                    build.LayerSpec("Gemm", solution.f2, old.bias, trans_b=layer.trans_b, beta=old.beta))
        return build.LayerSpec("MatMul", solution.f1), build.LayerSpec("MatMul", solution.f2)
