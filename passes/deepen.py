"""The depth morph: one Conv, Gemm or MatMul layer becomes two that compose to it, a P-activation between."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph import build, solvers
from onnxmorph import graph as mgraph
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import ConvGeometry, LayerInfo
from onnxmorph.passinfra import (
    SEED,
    MorphPass,
    Param,
    PassResult,
    dims,
    layer_name,
    new_layer_bytes,
    positive_int,
    register,
)

log = logging.getLogger("onnxmorph")

DEEPEN_OPS = ("Conv", "Gemm", "MatMul")
METHODS = ("netmorph", "identity")
DEFAULT_CONV_KERNEL = 3


@dataclass(frozen=True)
class DeepenPlan:
    """Everything `call` needs, decided by `requires`: the canonical parent filter and the new geometry.

    `weight` is the parent's weight array as stored; `g` is it as `[Co, Ci/groups, *K]` (Conv) or
    `[Co, Ci]` (Gemm with alpha folded in, MatMul), float64, built only when solving (big classifier
    weights make that copy costly, and `inspect` never needs it). `k2` is the new layer's kernel
    (`()` for Gemm/MatMul).
    """

    op: str
    node: str
    weight: np.ndarray
    k2: tuple[int, ...]
    width: int
    groups: int
    dtype: np.dtype
    opset: int
    solution: solvers.DepthSolution | None = None  # solved by requires() when only solving tells
    geometry: ConvGeometry | None = None
    trans_a: bool = False
    trans_b: bool = True
    alpha: float = 1.0

    @property
    def g(self) -> np.ndarray:
        g = np.asarray(self.weight, dtype=np.float64)
        if self.op == "Gemm":
            g = self.alpha * (g if self.trans_b else g.T)
        elif self.op == "MatMul":
            g = g.T
        return g

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:]) if self.op == "Conv" else ()

    @property
    def out_channels(self) -> int:
        if self.op == "Conv" or (self.op == "Gemm" and self.trans_b):
            return int(self.weight.shape[0])
        return int(self.weight.shape[1])

    @property
    def in_channels(self) -> int:
        """Input channels per group (the second axis of the canonical filter)."""
        if self.op == "Conv" or (self.op == "Gemm" and self.trans_b):
            return int(self.weight.shape[1])
        return int(self.weight.shape[0])

    @property
    def exact_by_counting(self) -> bool:
        """The paper's sufficient condition for Algorithm 1 at full kernel sizes (per group)."""
        co_g, ci_g, cm_g = self.out_channels // self.groups, self.in_channels, self.width // self.groups
        k = self.kernel
        composite = math.prod(a + b - 1 for a, b in zip(k, self.k2))
        return max(cm_g * ci_g * math.prod(k), co_g * cm_g * math.prod(self.k2)) >= co_g * ci_g * composite


def _shown(k: tuple[int, ...]) -> str:
    return "x".join(map(str, k)) or "1"


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
        Param("layer", layer_name, "the Conv, Gemm or MatMul layer (node or output name)", metavar="L"),
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
        view = mgraph.read_view(model)
        node = mgraph.find_layer(view, self.layer, DEEPEN_OPS)
        label = f"layer '{self.layer}'"
        version = mgraph.opset(model)
        # A weight tied to another node would silently come untied: refuse rather than guess.
        weight = mgraph.exclusive_constant(node, 1)
        w = mgraph.values(weight)
        if w.dtype.kind != "f":
            raise NotApplicable(f"{label}: weight '{weight.name}' has type {w.dtype}, not a float type")
        problem = build.activation_problem(self.activation, version, w.dtype)
        if problem is not None:
            raise NotApplicable(f"{label}: {problem}")
        if len(node.outputs) != 1:
            raise NotApplicable(f"{label}: {node.op} with {len(node.outputs)} outputs")
        if node.op == "Conv":
            plan = self._conv_plan(model, node, w, label, version)
        elif node.op == "Gemm":
            plan = self._gemm_plan(node, w, label, version)
        else:
            plan = self._matmul_plan(node, w, label, version)
        if not np.all(np.isfinite(w)):
            raise NotApplicable(f"{label}: weight '{weight.name}' holds NaN or infinite values")
        if plan.width % plan.groups:
            raise NotApplicable(f"{label}: --width {plan.width} is not a multiple of its {plan.groups} groups")
        if self.method == "identity" and plan.width < plan.out_channels:
            raise NotApplicable(
                f"{label}: identity deepening needs --width >= its {plan.out_channels} output channels, "
                f"got {plan.width}"
            )
        return plan

    def _kernel_for(self, nd: int, label: str) -> tuple[int, ...]:
        if self.kernel is None:
            return (DEFAULT_CONV_KERNEL,) * nd
        k2 = tuple(self.kernel) * nd if len(self.kernel) == 1 else tuple(self.kernel)
        if len(k2) != nd:
            raise NotApplicable(f"{label}: --kernel {_shown(tuple(self.kernel))} has {len(k2)} axes, "
                                f"the layer has {nd} spatial axes")
        return k2

    def _conv_plan(self, model: mgraph.Analysis, node: gs.Node, w: np.ndarray, label: str,
                   version: int) -> DeepenPlan:
        nd = w.ndim - 2
        if nd < 1:
            raise NotApplicable(f"{label}: Conv weight {list(w.shape)} has no spatial axes")
        geometry = mgraph.conv_geometry(node, mgraph.tensor_shapes(model))
        if tuple(w.shape[2:]) != geometry.kernel:
            raise NotApplicable(f"{label}: kernel_shape {list(geometry.kernel)} differs from its weight "
                                f"{list(w.shape)}")
        if len(geometry.strides) != nd or len(geometry.dilations) != nd or len(geometry.pads_begin) != nd:
            raise NotApplicable(f"{label}: strides, dilations or pads do not have {nd} axes")
        if w.shape[0] % geometry.group:
            raise NotApplicable(f"{label}: {w.shape[0]} output channels are not divisible by group "
                                f"{geometry.group}")
        return DeepenPlan(
            op="Conv", node=node.name, weight=w, k2=self._kernel_for(nd, label),
            width=self.width or int(w.shape[0]), groups=geometry.group, dtype=w.dtype, opset=version,
            geometry=geometry,
        )

    def _no_kernel(self, op: str, label: str) -> None:
        if self.kernel is not None and any(k != 1 for k in self.kernel):
            raise NotApplicable(f"{label}: --kernel {_shown(tuple(self.kernel))} is for Conv layers; a {op} "
                                "has no kernel (leave --kernel out or give 1)")

    def _gemm_plan(self, node: gs.Node, w: np.ndarray, label: str, version: int) -> DeepenPlan:
        self._no_kernel("Gemm", label)
        if w.ndim != 2:
            raise NotApplicable(f"{label}: Gemm weight {list(w.shape)} is not 2-D")
        trans_a = bool(node.attrs.get("transA", 0))
        trans_b = bool(node.attrs.get("transB", 0))
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise NotApplicable(f"{label}: Gemm alpha {alpha} or beta {beta} is not finite")
        return DeepenPlan(
            op="Gemm", node=node.name, weight=w, k2=(), width=self.width or int(w.shape[0 if trans_b else 1]),
            groups=1, dtype=w.dtype, opset=version, trans_a=trans_a, trans_b=trans_b, alpha=alpha,
        )

    def _matmul_plan(self, node: gs.Node, w: np.ndarray, label: str, version: int) -> DeepenPlan:
        self._no_kernel("MatMul", label)
        if w.ndim != 2:
            raise NotApplicable(f"{label}: MatMul weight {list(w.shape)} is not a 2-D matrix (batched weights "
                                "are not supported)")
        return DeepenPlan(
            op="MatMul", node=node.name, weight=w, k2=(), width=self.width or int(w.shape[1]),
            groups=1, dtype=w.dtype, opset=version,
        )

    def _solve(self, plan: DeepenPlan) -> solvers.DepthSolution:
        try:
            return solvers.solve_deepen(plan.g, plan.k2, plan.width, np.random.default_rng(self.seed),
                                        groups=plan.groups, method=self.method)
        except ValueError as exc:
            raise NotApplicable(f"layer '{self.layer}': {str(exc).splitlines()[0]}") from exc

    def new_weights(self, model: onnx.ModelProto) -> tuple[int, int]:
        return new_layer_bytes(model, self.layer, self.width, self.kernel), 1

    def requires(self, model: mgraph.ModelOrAnalysis) -> DeepenPlan:
        plan = self._plan(mgraph.analysis(model))
        # With width >= C_out per group an exact solution always exists (the 1x1 limit of Algorithm 2,
        # or the identity); narrower widths may have none, and only solving tells: then the plan
        # carries the solution, and call() does not solve again.
        if plan.width // plan.groups < plan.out_channels // plan.groups:
            plan = dataclasses.replace(plan, solution=self._solve(plan))
        return plan

    def describe(self, plan: DeepenPlan) -> dict[str, Any]:
        facts: dict[str, Any] = {"method": self.method, "width": plan.width}
        if plan.op == "Conv":
            facts["kernel"] = f"{_shown(plan.kernel)} then {_shown(plan.k2)}"
        if self.method == "netmorph":
            facts["algorithm"] = ("1 (exact by counting)" if plan.exact_by_counting
                                  else "2 (shrinks one factor's kernel)")
        facts["activation"] = self.activation
        return facts

    # ------------------------------------------------------------------ rewrite

    def call(self, model: mgraph.ModelOrAnalysis, plan: DeepenPlan) -> PassResult:
        model = mgraph.model_of(model)
        solution = plan.solution or self._solve(plan)
        log.info("deepen '%s': %s, residual %.1e", self.layer, solution.algorithm, solution.residual)
        graph = mgraph.import_graph(model)
        node = mgraph.find_layer(graph, self.layer, DEEPEN_OPS)
        x, y = node.inputs[0], node.outputs[0]
        old_inputs = list(node.inputs)
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
        namer = mgraph.Namer(graph)
        scope = build.fresh_scope(namer, node.name or y.name, "morph_deepen")
        first, second = self._specs(plan, solution, node, old_inputs)
        tag = plan.op.lower()
        rank = len(plan.kernel) + 2 if plan.op == "Conv" else 2
        build.insert_layer_pair(
            graph, namer, scope, x, y, first, second, activation=self.activation,
            channel_axis=-1 if plan.op == "MatMul" else 1, rank=rank, dtype=plan.dtype, opset=plan.opset,
            tags=(f"{tag}_a", f"{tag}_b"),
        )
        return PassResult(mgraph.export_model(graph, like=model), True)

    def _specs(self, plan: DeepenPlan, solution: solvers.DepthSolution, node: gs.Node,
               old_inputs: list[gs.Tensor]) -> tuple[build.LayerSpec, build.LayerSpec]:
        zero_bias = np.zeros(plan.width)
        parent_bias = old_inputs[2] if len(old_inputs) > 2 and old_inputs[2].name else None
        if plan.op == "Conv":
            assert plan.geometry is not None
            g1, g2 = build.pair_geometries(plan.geometry, plan.k2)
            # Layer 1's bias is zero, so layer 2 keeps the parent's bias unchanged (carry_bias with b1 = 0).
            return (build.LayerSpec("Conv", solution.f1, zero_bias, g1),
                    build.LayerSpec("Conv", solution.f2, parent_bias, g2))
        if plan.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            bias: np.ndarray | gs.Tensor | None = parent_bias
            if isinstance(parent_bias, gs.Constant):
                # Fold beta into a constant C (any broadcastable shape is kept).
                bias = beta * np.asarray(parent_bias.values, dtype=np.float64)
                beta = 1.0
            return (build.LayerSpec("Gemm", solution.f1, zero_bias, trans_a=plan.trans_a, trans_b=plan.trans_b),
                    build.LayerSpec("Gemm", solution.f2, bias, trans_b=plan.trans_b, beta=beta))
        return build.LayerSpec("MatMul", solution.f1), build.LayerSpec("MatMul", solution.f2)
