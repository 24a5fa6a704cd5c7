"""Subnet morphs: one layer becomes a module (a chain, parallel branches, or a residual block)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph.contract import passinfra
from onnxmorph.contract.passinfra import SEED, MorphPass, Param, PassResult, dims, int_list, layer_name, positive_int
from onnxmorph.contract.registry import register
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import build, layers
from onnxmorph.graph import core as mgraph
from onnxmorph.graph.core import LayerInfo
from onnxmorph.graph.layers import Layer
from onnxmorph.numerics import splitting
from onnxmorph.numerics.geometry import (
    ConvGeometry,
    chain_geometries,
    inner_geometry,
    pair_geometries,
    pointwise,
    shown,
)

log = logging.getLogger("onnxmorph")

KINDS = ("sequential", "parallel", "residual")
SUBNET_OPS = layers.SOLVABLE_OPS


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class SubnetPlan:
    """The parent layer and the module decided by `requires`: inner width, chain kernel, branch kernels."""

    layer: Layer
    width: int
    k2: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]

    @property
    def geometry(self) -> ConvGeometry | None:
        return self.layer.geometry


@register
class SubnetPass(MorphPass):
    """Morph one layer (Conv, Gemm or MatMul) into a module that computes exactly the same function.

    sequential: L becomes `--depth` layers (repeated NetMorph depth splits; for a Conv the first keeps
    L's kernel, the others `--kernel`), a P-activation (identity at morph time) after each but the last.
    parallel: L becomes `--branches` layers joined by a Sum, their filters summing to L's (all but one
    random, the last the remainder; `--kernels 1,3,5` gives Conv branches smaller, centred kernels,
    an unpadded conv's smaller branches crop their input), each branch deepened to `--depth` layers
    when asked (an Inception-like module).
    residual: L(x) = M(x) + B(x) with B a two-layer branch (Conv: `--kernels[0]` centred in L's
    kernel, then 1x1) with a P-activation and M the dense remainder with L's kernel (Modularized
    Morphing; the default 1x1 -> 1x1 branch is the "1c1" module). `--kernels K,K2` with K L's kernel
    and K2 > 1 grows M's kernel to K + K2 - 1 instead.
    Names (TAG is conv, gemm or matmul): `<L>/morph_subnet/TAG_<i>` (sequential),
    `<L>/morph_subnet/branch_<b>/TAG_<i>` and `<L>/morph_subnet/sum` (parallel),
    `<L>/morph_subnet/main`, `<L>/morph_subnet/branch/TAG_1|TAG_2` and `<L>/morph_subnet/add`
    (residual); P-activations are `<layer>/act` with the parameter `<layer>/act_a`; the module's
    output keeps L's output tensor name, so later recipe steps can still name it.
    """

    name = "subnet"
    summary = "morph a layer into a module: a chain, parallel branches, or a residual block"
    params = (
        Param("layer", layer_name, "the Conv, Gemm or MatMul layer: node name, output name or module "
              "path, as inspect prints them", metavar="L"),
        Param("kind", str, "sequential, parallel or residual", choices=KINDS),
        Param("depth", positive_int, "layers per chain (sequential: default 2; parallel: per branch, "
              "default 1)", default=None, metavar="N"),
        Param("branches", positive_int, "parallel branches (default 2, or the number of --kernels)",
              default=None, metavar="N"),
        Param("kernels", int_list, "parallel: one kernel size per branch, e.g. 1,3,5 (default L's kernel); "
              "residual: the branch's two kernels (default 1,1: the 1c1 module)", default=None,
              metavar="K,..."),
        Param("kernel", dims, "kernel of the added layers of a chain (default 3, 1 on axes where L's is 1)",
              default=None, metavar="K"),
        Param("width", positive_int, "channels inside chains and the residual branch (default L's outputs)",
              default=None, metavar="C"),
        Param("activation", str, "P-activation between new layers, the identity at morph time",
              default="relu", choices=build.ACTIVATIONS),
        SEED,
    )

    @classmethod
    def probe(cls, model: onnx.ModelProto, layer: LayerInfo) -> MorphPass | None:
        if layer.op not in SUBNET_OPS:
            return None
        return cls(layer=layer.name, kind="residual")

    def new_weights(self, model: onnx.ModelProto) -> tuple[int, int]:
        branches = self.branches or (len(self.kernels) if self.kernels else 2)
        depth = self.depth or 2
        layers = depth * branches if self.kind == "parallel" else depth if self.kind == "sequential" else 3
        kernel = tuple(self.kernel or ()) + tuple(self.kernels or ())
        return passinfra.new_layer_bytes(model, self.layer, self.width, kernel, count=layers), layers

    # ------------------------------------------------------------------ checks

    def _plan(self, model: mgraph.Analysis) -> SubnetPlan:
        layer = layers.read_layer(model, self.layer, SUBNET_OPS)
        label = layer.label
        layer.check_finite()
        problem = build.activation_problem(self.activation, layer.opset, layer.dtype)
        if problem is not None:
            raise NotApplicable(f"{label}: {problem}")
        co, groups = layer.out_channels, layer.groups
        width = self.width or co
        if width % groups:
            raise NotApplicable(f"{label}: width {width} and {co} outputs must be multiples of its {groups} groups")
        if width < co:
            raise NotApplicable(f"{label}: --width {width} is narrower than its {co} output channels "
                                "(an exact split is only guaranteed from C_out on)")
        self._check_kind(label)
        if layer.geometry is None:
            for flag, sizes in (("--kernel", self.kernel), ("--kernels", self.kernels)):
                if sizes is not None and any(k != 1 for k in sizes):
                    raise NotApplicable(f"{label}: {flag} is for Conv layers")
            count = {"sequential": 0, "residual": 2}.get(self.kind, self._branch_count())
            return SubnetPlan(layer, width, (), ((),) * count)
        if min(layer.geometry.pads) < 0:
            raise NotApplicable(f"{label}: negative pads {layer.geometry.pads}")
        default_k2 = tuple(1 if k == 1 else 3 for k in layer.kernel)
        k2 = default_k2 if self.kernel is None else layer.expand_kernel(self.kernel, "--kernel")
        return SubnetPlan(layer, width, k2, self._kernels(layer.kernel, label))

    def _branch_count(self) -> int:
        return self.branches or (len(self.kernels) if self.kernels else 2)

    def _check_kind(self, label: str) -> None:
        """The flags that go with `--kind`."""
        if self.kind == "sequential":
            if self.branches is not None or self.kernels is not None:
                raise NotApplicable(f"{label}: --branches and --kernels are for parallel and residual subnets")
            if (self.depth or 2) < 2:
                raise NotApplicable(f"{label}: a sequential subnet needs --depth of at least 2")
        elif self.kind == "residual":
            if self.branches is not None or self.depth is not None:
                raise NotApplicable(f"{label}: --branches and --depth are for parallel and sequential subnets")
        elif self._branch_count() < 2:
            raise NotApplicable(f"{label}: a parallel subnet needs at least 2 branches")

    def _kernels(self, k: tuple[int, ...], label: str) -> tuple[tuple[int, ...], ...]:
        """The branch kernels of a Conv's parallel or residual module (none for a chain)."""
        if self.kind == "sequential":
            return ()
        if self.kind == "residual":
            sizes = self.kernels or (1, 1)
            if len(sizes) != 2:
                raise NotApplicable(f"{label}: a residual branch takes two kernels (e.g. 1,1), got {len(sizes)}")
            if max(k) == 1 and max(sizes) > 1:
                raise NotApplicable(f"{label}: a 1x1 layer's residual branch is 1x1 -> 1x1 (--kernels 1,1), "
                                    f"not {','.join(map(str, sizes))}")
            k1 = tuple(1 if a == 1 else sizes[0] for a in k)
            kb = tuple(1 if a == 1 else sizes[1] for a in k)
            if any(b != 1 for b in kb) and k1 != k:
                raise NotApplicable(f"{label}: a residual branch with second kernel {sizes[1]} needs its first "
                                    f"kernel equal to the layer's {shown(k)}")
            if all(b == 1 for b in kb) and any(a > b for a, b in zip(k1, k)):
                raise NotApplicable(f"{label}: branch kernel {shown(k1)} is larger than the layer's {shown(k)}")
            return (k1, kb)
        count = self._branch_count()
        sizes = self.kernels or (max(k),) * count
        if len(sizes) != count:
            raise NotApplicable(f"{label}: {len(sizes)} --kernels for {count} branches")
        if any(s > a for s in sizes for a in k if a != 1) or (max(k) == 1 and max(sizes) > 1):
            raise NotApplicable(f"{label}: branch kernels {','.join(map(str, sizes))} exceed the layer's "
                                f"{shown(k)}; grow it first with the kernel morph")
        branch_kernels = tuple(tuple(1 if a == 1 else s for a in k) for s in sizes)
        if not any(bk == k for bk in branch_kernels):
            raise NotApplicable(f"{label}: one branch must keep the layer's kernel {shown(k)} "
                                f"(the remainder branch), got kernels {','.join(map(str, sizes))}")
        return branch_kernels

    def requires(self, model: mgraph.ModelOrAnalysis) -> SubnetPlan:
        return self._plan(mgraph.analysis(model))

    def describe(self, plan: SubnetPlan) -> dict[str, Any]:
        if plan.geometry is None:
            op = plan.layer.op
            return {"kind": self.kind, "module": f"{op} + two-{op} branch"}
        nd = len(plan.geometry.kernel)
        return {"kind": self.kind, "module": "1c1" if plan.kernels == ((1,) * nd,) * 2 else
                shown(plan.kernels[0]) + " branch"}

    # ------------------------------------------------------------------ rewrite

    def call(self, model: mgraph.ModelOrAnalysis, plan: SubnetPlan) -> PassResult:
        # `requires` checked what makes the split exist (width >= C_out, kernels inside the layer's);
        # a ValueError from the solvers here is a numerical failure, not a refusal.
        model = mgraph.model_of(model)
        graph = mgraph.import_graph(model)
        old = layers.detach(graph, plan.layer)
        module = _Builder(graph, plan, old, self.activation, np.random.default_rng(self.seed))
        scope = old.scope(module.namer, "morph_subnet")
        g = plan.layer.canonical()
        if self.kind == "sequential":
            module.chain(scope, old.x, g, plan.geometry, self.depth or 2, old.bias, out=old.y)
        elif self.kind == "parallel":
            module.parallel(scope, g, self.depth or 1)
        else:
            module.residual(scope, g)
        return PassResult(mgraph.export_model(graph, like=model), True)


class _Builder:
    """Builds the module that replaces the detached layer `old` in `graph`."""

    def __init__(self, graph: gs.Graph, plan: SubnetPlan, old: layers.Detached, activation: str,
                 rng: np.random.Generator) -> None:
        self.graph, self.plan, self.old, self.activation, self.rng = graph, plan, old, activation, rng
        self.namer = mgraph.Namer(graph)
        self.layer = plan.layer
        self.tag = plan.layer.op.lower()

    def spec(self, f: np.ndarray, geometry: ConvGeometry | None, bias: np.ndarray | gs.Tensor | None, *,
             reads_input: bool) -> build.LayerSpec:
        """A new layer like the parent: Conv with `geometry`, or Gemm/MatMul with the parent's layout."""
        layer = self.layer
        if layer.op == "Conv":
            return build.LayerSpec("Conv", f, bias, geometry)
        if layer.op == "MatMul":
            return build.LayerSpec("MatMul", f)  # the parent's bias, an Add after it, stays in place
        # the parent's beta goes with its computed bias; Gemm needs C before opset 11
        beta = self.old.beta if bias is self.old.bias and isinstance(bias, gs.Tensor) else 1.0
        return build.LayerSpec("Gemm", f, np.zeros(f.shape[0]) if bias is None else bias,
                               trans_a=layer.trans_a and reads_input, trans_b=layer.trans_b, beta=beta)

    def add(self, scope: str, tag: str, x: gs.Tensor, spec: build.LayerSpec, out: gs.Variable | None = None
            ) -> gs.Variable:
        return build.add_layer(self.graph, self.namer, scope, tag, x, spec, self.layer.dtype, out=out)

    def act(self, scope: str, h: gs.Tensor, channels: int) -> gs.Variable:
        layer = self.layer
        return build.p_activation(self.graph, self.namer, scope, h, self.activation, channels, layer.channel_axis,
                                  layer.rank, layer.dtype, layer.opset)

    def chain(self, scope: str, x: gs.Tensor, g: np.ndarray, geometry: ConvGeometry | None, depth: int,
              bias: np.ndarray | gs.Tensor | None, out: gs.Variable | None = None) -> gs.Variable:
        """`depth` layers computing filter `g` (with `geometry`) on `x`; the last writes `out` when given.

        Only the last layer has `bias`: the others' are zero, so nothing leaks through (carry_bias).
        """
        plan = self.plan
        filters = splitting.chain_filters(g, depth, plan.k2, plan.width, self.rng, self.layer.groups)
        geometries = chain_geometries(geometry, depth, plan.k2) if geometry is not None else [None] * depth
        h = x
        for i, (f, geo) in enumerate(zip(filters, geometries), 1):
            last = i == depth
            spec = self.spec(f, geo, bias if last else np.zeros(f.shape[0]), reads_input=i == 1)
            h = self.add(scope, f"{self.tag}_{i}", h, spec, out if last else None)
            if not last:
                h = self.act(f"{scope}/{self.tag}_{i}", h, f.shape[0])
        return h

    def parallel(self, scope: str, g: np.ndarray, depth: int) -> None:
        plan = self.plan
        # split_parallel works on the [Co, Ci/groups] filter as is: every branch keeps L's groups.
        parts = splitting.split_parallel(g, plan.kernels, self.rng)
        outputs = []
        for b, (part, kernel) in enumerate(zip(parts, plan.kernels), 1):
            branch_x, geometry = self.old.x, None
            if plan.geometry is not None:
                branch_x, geometry = build.crop_input(self.graph, self.namer, f"{scope}/branch_{b}", self.old.x,
                                                      inner_geometry(plan.geometry, kernel), self.layer.opset)
            outputs.append(self.chain(f"{scope}/branch_{b}", branch_x, part, geometry, depth,
                                      self.old.bias if b == len(parts) else None))
        self.graph.nodes.append(gs.Node("Sum", name=self.namer(scope, "sum"), inputs=outputs, outputs=[self.old.y]))

    def residual(self, scope: str, g: np.ndarray) -> None:
        plan, x = self.plan, self.old.x
        k1, kb = plan.kernels
        groups = self.layer.groups
        branch_x = x
        main_geometry = g1 = g2 = None
        if plan.geometry is None:
            main, f1, f2 = splitting.split_residual(g, (), plan.width, self.rng)
        elif any(k != 1 for k in kb):
            main, f1, f2 = splitting.split_residual(g, kb, plan.width, self.rng, groups=groups)
            g1, g2 = pair_geometries(plan.geometry, kb)
            main_geometry = dataclasses.replace(g1, kernel=main.shape[2:], strides=plan.geometry.strides)
        else:
            main, f1, f2 = splitting.split_residual_centred(g, k1, plan.width, self.rng, groups=groups)
            main_geometry = plan.geometry
            branch_x, g1 = build.crop_input(self.graph, self.namer, f"{scope}/branch", x,
                                            inner_geometry(plan.geometry, k1), self.layer.opset)
            g2 = pointwise(len(k1), groups)
        main_out = self.add(scope, "main", x, self.spec(main, main_geometry, self.old.bias, reads_input=True))
        branch = f"{scope}/branch"
        h = self.add(branch, f"{self.tag}_1", branch_x, self.spec(f1, g1, np.zeros(f1.shape[0]), reads_input=True))
        h = self.act(f"{branch}/{self.tag}_1", h, f1.shape[0])
        h = self.add(branch, f"{self.tag}_2", h, self.spec(f2, g2, np.zeros(f2.shape[0]), reads_input=False))
        self.graph.nodes.append(gs.Node("Add", name=self.namer(scope, "add"), inputs=[main_out, h],
                                        outputs=[self.old.y]))
