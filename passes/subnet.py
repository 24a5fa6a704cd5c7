"""Subnet morphs: one layer becomes a module (a chain, parallel branches, or a residual block)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxmorph.passes.deepen import DeepenPass

from onnxmorph import build, passinfra, splitting
from onnxmorph import graph as mgraph
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import ConvGeometry, LayerInfo
from onnxmorph.passinfra import SEED, MorphPass, Param, PassResult, dims, int_list, layer_name, positive_int, register

log = logging.getLogger("onnxmorph")

KINDS = ("sequential", "parallel", "residual")
SUBNET_OPS = ("Conv", "Gemm", "MatMul")


def inner_geometry(parent: ConvGeometry, inner: Sequence[int]) -> ConvGeometry:
    """Geometry of a conv with the smaller, centred kernel `inner` that reads what `parent`'s taps read."""
    off = splitting.centred_offsets(parent.kernel, inner)
    d = parent.dilations
    begin = tuple(p - di * o for p, di, o in zip(parent.pads_begin, d, off))
    end = tuple(p - di * (k - s - o) for p, di, k, s, o in zip(parent.pads_end, d, parent.kernel, inner, off))
    return ConvGeometry(tuple(inner), begin, end, parent.strides, d, parent.group)


def crop_input(graph: gs.Graph, namer: mgraph.Namer, scope: str, x: gs.Tensor, geometry: ConvGeometry,
               opset: int) -> tuple[gs.Tensor, ConvGeometry]:
    """(`x`, `geometry`) unchanged when its pads are >= 0; else a Slice of `x` doing the negative pads.

    A smaller centred kernel inside an unpadded conv starts reading `offset` pixels in: a negative
    pad, which ONNX Conv does not allow; cropping those pixels first is the same computation.
    """
    if min(geometry.pads) >= 0:
        return x, geometry
    nd = len(geometry.kernel)
    starts = [max(0, -p) for p in geometry.pads_begin]
    ends = [p if p < 0 else np.iinfo(np.int64).max for p in geometry.pads_end]
    axes = list(range(2, 2 + nd))
    out = gs.Variable(namer(scope, "crop", "out"), dtype=x.dtype)
    name = namer(scope, "crop")
    if opset < 10:
        graph.nodes.append(gs.Node("Slice", name=name, inputs=[x], outputs=[out],
                                   attrs={"starts": starts, "ends": ends, "axes": axes}))
    else:
        consts = [mgraph.constant(namer(name, tag), np.array(v, dtype=np.int64), np.int64)
                  for tag, v in (("starts", starts), ("ends", ends), ("axes", axes))]
        graph.nodes.append(gs.Node("Slice", name=name, inputs=[x, *consts], outputs=[out]))
    clamped = ConvGeometry(geometry.kernel, tuple(max(0, p) for p in geometry.pads_begin),
                           tuple(max(0, p) for p in geometry.pads_end), geometry.strides, geometry.dilations,
                           geometry.group)
    return out, clamped


def chain_geometries(parent: ConvGeometry, depth: int, k2: Sequence[int]) -> list[ConvGeometry]:
    """Geometries of a chain of `depth` convs replacing `parent` (each split as `build.pair_geometries`)."""
    out: list[ConvGeometry] = []
    rest = parent
    for _ in range(depth - 1):
        first, rest = build.pair_geometries(rest, k2)
        out.append(first)
    out.append(rest)
    return out


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class SubnetPlan:
    """The parent layer as the subnet morph sees it (`g` canonical: `[Co, Ci/groups, *K]` or `[Co, Ci]`)."""

    g: np.ndarray
    geometry: ConvGeometry | None
    dtype: np.dtype
    opset: int
    rank: int | None
    width: int
    k2: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]
    op: str = "Conv"
    trans_a: bool = False
    trans_b: bool = True
    bias_beta: float = 1.0  # the parent Gemm's beta, kept on a layer that reuses its computed bias tensor

    @property
    def groups(self) -> int:
        return self.geometry.group if self.geometry is not None else 1

    @property
    def channel_axis(self) -> int:
        return -1 if self.op == "MatMul" else 1


def _shown(k: Sequence[int]) -> str:
    return "x".join(map(str, k)) or "1"


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
        Param("layer", layer_name, "the Conv, Gemm or MatMul layer (node or output name)", metavar="L"),
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
        view = mgraph.read_view(model)
        node = mgraph.find_layer(view, self.layer, SUBNET_OPS)
        label = f"layer '{self.layer}'"
        mgraph.exclusive_constant(node, 1)
        if node.op != "Conv":
            return self._dense_plan(model, label)
        w = mgraph.values(node.inputs[1])
        version = mgraph.opset(model)
        if w.dtype.kind != "f":
            raise NotApplicable(f"{label}: weight type {w.dtype} is not a float type")
        if not np.all(np.isfinite(w)):
            raise NotApplicable(f"{label}: its weight holds NaN or infinite values")
        nd = w.ndim - 2
        if nd < 1:
            raise NotApplicable(f"{label}: Conv weight {list(w.shape)} has no spatial axes")
        if len(node.outputs) != 1:
            raise NotApplicable(f"{label}: Conv with {len(node.outputs)} outputs")
        geometry = mgraph.conv_geometry(node, mgraph.tensor_shapes(model))
        if tuple(w.shape[2:]) != geometry.kernel:
            raise NotApplicable(f"{label}: kernel_shape {list(geometry.kernel)} differs from its weight "
                                f"{list(w.shape)}")
        if min(geometry.pads) < 0:
            raise NotApplicable(f"{label}: negative pads {geometry.pads}")
        problem = build.activation_problem(self.activation, version)
        if problem is not None:
            raise NotApplicable(f"{label}: {problem}")
        groups = geometry.group
        co = int(w.shape[0])
        width = self.width or co
        if width % groups or co % groups:
            raise NotApplicable(f"{label}: width {width} and {co} outputs must be multiples of its {groups} groups")
        if width < co:
            raise NotApplicable(f"{label}: --width {width} is narrower than its {co} output channels "
                                "(an exact split is only guaranteed from C_out on)")
        if self.kernel is None:
            k2 = tuple(1 if k == 1 else 3 for k in geometry.kernel)
        else:
            k2 = tuple(self.kernel) * nd if len(self.kernel) == 1 else tuple(self.kernel)
            if len(k2) != nd:
                raise NotApplicable(f"{label}: --kernel {_shown(self.kernel)} has {len(k2)} axes, the layer {nd}")
        kernels = self._kernels(geometry, label, nd)
        return SubnetPlan(np.asarray(w, dtype=np.float64), geometry, w.dtype, version, nd + 2, width, k2, kernels)

    def _dense_plan(self, model: mgraph.Analysis, label: str) -> SubnetPlan:
        """A Gemm or MatMul, parsed as the depth morph parses it (alpha folded in, canonical [Co, Ci])."""
        if self.kernel is not None and any(k != 1 for k in self.kernel):
            raise NotApplicable(f"{label}: --kernel is for Conv layers")
        if self.kernels is not None and any(k != 1 for k in self.kernels):
            raise NotApplicable(f"{label}: --kernels is for Conv layers")
        dense = DeepenPass(layer=self.layer, width=self.width, activation=self.activation).requires(model)
        if dense.width < dense.out_channels:
            raise NotApplicable(f"{label}: --width {dense.width} is narrower than its {dense.out_channels} outputs "
                                "(an exact split is only guaranteed from C_out on)")
        if self.kind == "sequential":
            if self.branches is not None or self.kernels is not None:
                raise NotApplicable(f"{label}: --branches and --kernels are for parallel and residual subnets")
            if (self.depth or 2) < 2:
                raise NotApplicable(f"{label}: a sequential subnet needs --depth of at least 2")
            kernels: tuple[tuple[int, ...], ...] = ()
        elif self.kind == "residual":
            if self.branches is not None or self.depth is not None:
                raise NotApplicable(f"{label}: --branches and --depth are for parallel and sequential subnets")
            kernels = ((), ())
        else:
            count = self.branches or (len(self.kernels) if self.kernels else 2)
            if count < 2:
                raise NotApplicable(f"{label}: a parallel subnet needs at least 2 branches")
            kernels = ((),) * count
        rank = 2 if dense.op == "Gemm" else None
        return SubnetPlan(dense.g, None, dense.dtype, dense.opset, rank, dense.width, (), kernels, op=dense.op,
                          trans_a=dense.trans_a, trans_b=dense.trans_b)

    def _spec(self, plan: SubnetPlan, f: np.ndarray, bias: np.ndarray | gs.Tensor | None,
              geometry: ConvGeometry | None, reads_input: bool, parent_bias: bool = False) -> build.LayerSpec:
        """A new layer like the parent: Conv with `geometry`, or Gemm/MatMul with the parent's layout."""
        if plan.op == "Conv":
            return build.LayerSpec("Conv", f, bias, geometry)
        if plan.op == "MatMul":
            return build.LayerSpec("MatMul", f)  # the parent's bias, an Add after it, stays in place
        beta = plan.bias_beta if parent_bias and isinstance(bias, gs.Tensor) else 1.0
        if bias is None:
            bias = np.zeros(f.shape[0])  # Gemm needs C before opset 11
        return build.LayerSpec("Gemm", f, bias, trans_a=plan.trans_a and reads_input, trans_b=plan.trans_b,
                               beta=beta)

    def _kernels(self, geometry: ConvGeometry, label: str, nd: int) -> tuple[tuple[int, ...], ...]:
        k = geometry.kernel
        if self.kind == "sequential":
            if self.branches is not None or self.kernels is not None:
                raise NotApplicable(f"{label}: --branches and --kernels are for parallel and residual subnets")
            if (self.depth or 2) < 2:
                raise NotApplicable(f"{label}: a sequential subnet needs --depth of at least 2")
            return ()
        if self.kind == "residual":
            if self.branches is not None or self.depth is not None:
                raise NotApplicable(f"{label}: --branches and --depth are for parallel and sequential subnets")
            sizes = self.kernels or (1, 1)
            if len(sizes) != 2:
                raise NotApplicable(f"{label}: a residual branch takes two kernels (e.g. 1,1), got {len(sizes)}")
            if max(k) == 1 and max(sizes) > 1:
                raise NotApplicable(f"{label}: a 1x1 layer's residual branch is 1x1 -> 1x1 (--kernels 1,1), "
                                    f"not {','.join(map(str, sizes))}")
            k1 = tuple(1 if a == 1 else sizes[0] for a in k)
            kb = tuple(1 if a == 1 else sizes[1] for a in k)
            if any(b != 1 for b in kb):
                if k1 != k:
                    raise NotApplicable(f"{label}: a residual branch with second kernel {sizes[1]} needs its first "
                                        f"kernel equal to the layer's {_shown(k)}")
            else:
                if any(a > b for a, b in zip(k1, k)):
                    raise NotApplicable(f"{label}: branch kernel {_shown(k1)} is larger than the layer's {_shown(k)}")
            return (k1, kb)
        # parallel
        sizes = self.kernels
        count = self.branches or (len(sizes) if sizes else 2)
        if count < 2:
            raise NotApplicable(f"{label}: a parallel subnet needs at least 2 branches")
        if sizes is None:
            sizes = (max(k),) * count
        if len(sizes) != count:
            raise NotApplicable(f"{label}: {len(sizes)} --kernels for {count} branches")
        if any(s > a for s in sizes for a in k if a != 1) or (max(k) == 1 and max(sizes) > 1):
            raise NotApplicable(f"{label}: branch kernels {','.join(map(str, sizes))} exceed the layer's "
                                f"{_shown(k)}; grow it first with the kernel morph")
        branch_kernels = tuple(tuple(1 if a == 1 else s for a in k) for s in sizes)
        if not any(bk == k for bk in branch_kernels):
            raise NotApplicable(f"{label}: one branch must keep the layer's kernel {_shown(k)} "
                                f"(the remainder branch), got kernels {','.join(map(str, sizes))}")
        return branch_kernels

    def requires(self, model: mgraph.ModelOrAnalysis) -> SubnetPlan:
        return self._plan(mgraph.analysis(model))

    def describe(self, plan: SubnetPlan) -> dict[str, Any]:
        if plan.geometry is None:
            return {"kind": self.kind, "module": f"{plan.op} + two-{plan.op} branch"}
        nd = len(plan.geometry.kernel)
        return {"kind": self.kind, "module": "1c1" if plan.kernels == ((1,) * nd,) * 2 else
                "x".join(map(str, plan.kernels[0])) + " branch"}

    # ------------------------------------------------------------------ rewrite

    def call(self, model: mgraph.ModelOrAnalysis, plan: SubnetPlan) -> PassResult:
        model = mgraph.model_of(model)
        rng = np.random.default_rng(self.seed)
        graph = mgraph.import_graph(model)
        node = mgraph.find_layer(graph, self.layer, SUBNET_OPS)
        x, y = node.inputs[0], node.outputs[0]
        bias = node.inputs[2] if node.op != "MatMul" and len(node.inputs) > 2 and node.inputs[2].name else None
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if node.op == "Gemm" and isinstance(bias, gs.Constant):
            # Fold beta into a constant C (any broadcastable shape is kept), as the depth morph does.
            bias = beta * np.asarray(bias.values, dtype=np.float64)
            beta = 1.0
        plan = dataclasses.replace(plan, bias_beta=beta)
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
        namer = mgraph.Namer(graph)
        scope = build.fresh_scope(namer, node.name or y.name, "morph_subnet")
        try:
            if self.kind == "sequential":
                self._chain(graph, namer, scope, x, y, plan, plan.g, plan.geometry, self.depth or 2, bias, rng,
                            parent_bias=True)
            elif self.kind == "parallel":
                self._parallel(graph, namer, scope, x, y, plan, bias, rng)
            else:
                self._residual(graph, namer, scope, x, y, plan, bias, rng)
        except ValueError as exc:
            raise NotApplicable(f"layer '{self.layer}': {str(exc).splitlines()[0]}") from exc
        return PassResult(mgraph.export_model(graph, like=model), True)

    def _chain(self, graph: gs.Graph, namer: mgraph.Namer, scope: str, x: gs.Tensor, y: gs.Variable | None,
               plan: SubnetPlan, g: np.ndarray, geometry: ConvGeometry | None, depth: int,
               bias: np.ndarray | gs.Tensor | None, rng: np.random.Generator, parent_bias: bool = False) -> gs.Variable:
        """Layers computing filter `g` (with `geometry`) on `x` in `depth` layers; the last writes `y`."""
        filters = splitting.chain_filters(g, depth, plan.k2, plan.width, rng, plan.groups)
        geometries = chain_geometries(geometry, depth, plan.k2) if geometry is not None else [None] * depth
        tag = plan.op.lower()
        h = x
        for i, (f, geo) in enumerate(zip(filters, geometries), 1):
            last = i == depth
            # Only the last layer has a bias (L's): the others are zero, so nothing leaks through (carry_bias).
            b = bias if last else np.zeros(f.shape[0])
            spec = self._spec(plan, f, b, geo, reads_input=i == 1, parent_bias=parent_bias and last)
            h = build.add_layer(graph, namer, scope, f"{tag}_{i}", h, spec, plan.dtype, out=y if last else None)
            if not last:
                h = build.p_activation(graph, namer, f"{scope}/{tag}_{i}", h, self.activation, f.shape[0],
                                       plan.channel_axis, plan.rank, plan.dtype, plan.opset)
        return h

    def _parallel(self, graph: gs.Graph, namer: mgraph.Namer, scope: str, x: gs.Tensor, y: gs.Variable,
                  plan: SubnetPlan, bias: gs.Tensor | None, rng: np.random.Generator) -> None:
        # splitting.split_parallel works on the [Co, Ci/groups] filter as is: every branch keeps L's groups.
        parts = splitting.split_parallel(plan.g, plan.kernels, rng)
        outputs = []
        for b, (part, kernel) in enumerate(zip(parts, plan.kernels), 1):
            branch_x, geometry = x, None
            if plan.geometry is not None:
                branch_x, geometry = crop_input(graph, namer, f"{scope}/branch_{b}", x,
                                                inner_geometry(plan.geometry, kernel), plan.opset)
            last = b == len(parts)
            branch_bias = bias if last else None
            outputs.append(self._chain(graph, namer, f"{scope}/branch_{b}", branch_x, None, plan, part, geometry,
                                       self.depth or 1, branch_bias, rng, parent_bias=last))
        graph.nodes.append(gs.Node("Sum", name=namer(scope, "sum"), inputs=outputs, outputs=[y]))

    def _residual(self, graph: gs.Graph, namer: mgraph.Namer, scope: str, x: gs.Tensor, y: gs.Variable,
                  plan: SubnetPlan, bias: gs.Tensor | None, rng: np.random.Generator) -> None:
        k1, kb = plan.kernels
        groups = plan.groups
        branch_x = x
        main_geometry = g1 = g2 = None
        if plan.geometry is None:
            main, f1, f2 = splitting.split_residual(plan.g, (), plan.width, rng)
        elif any(k != 1 for k in kb):
            main, f1, f2 = splitting.split_residual(plan.g, kb, plan.width, rng, groups=groups)
            g1, g2 = build.pair_geometries(plan.geometry, kb)
            main_geometry = ConvGeometry(main.shape[2:], g1.pads_begin, g1.pads_end, plan.geometry.strides,
                                         plan.geometry.dilations, groups)
        else:
            main, f1, f2 = splitting.split_residual_centred(plan.g, k1, plan.width, rng, groups=groups)
            main_geometry = plan.geometry
            branch_x, g1 = crop_input(graph, namer, f"{scope}/branch", x, inner_geometry(plan.geometry, k1),
                                      plan.opset)
            nd = len(k1)
            g2 = ConvGeometry((1,) * nd, (0,) * nd, (0,) * nd, (1,) * nd, (1,) * nd, groups)
        tag = plan.op.lower()
        main_out = build.add_layer(graph, namer, scope, "main", x,
                                   self._spec(plan, main, bias, main_geometry, True, parent_bias=True), plan.dtype)
        branch = f"{scope}/branch"
        h = build.add_layer(graph, namer, branch, f"{tag}_1", branch_x,
                            self._spec(plan, f1, np.zeros(f1.shape[0]), g1, True), plan.dtype)
        h = build.p_activation(graph, namer, f"{branch}/{tag}_1", h, self.activation, f1.shape[0],
                               plan.channel_axis, plan.rank, plan.dtype, plan.opset)
        h = build.add_layer(graph, namer, branch, f"{tag}_2", h,
                            self._spec(plan, f2, np.zeros(f2.shape[0]), g2, False), plan.dtype)
        graph.nodes.append(gs.Node("Add", name=namer(scope, "add"), inputs=[main_out, h], outputs=[y]))
