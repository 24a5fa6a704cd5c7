"""Subnet morphs: one Conv layer becomes a module (a chain, parallel branches, or a residual block)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph import build, solvers
from onnxmorph import graph as mgraph
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import ConvGeometry, LayerInfo
from onnxmorph.passinfra import SEED, MorphPass, Param, PassResult, dims, int_list, layer_name, positive_int, register

log = logging.getLogger("onnxmorph")

KINDS = ("sequential", "parallel", "residual")
# Share of the parent filter's norm that the residual branch carries at morph time.
BRANCH_FRACTION = 0.5
# Relative error of a solved split above which the morph is refused instead of written.
MAX_SPLIT_ERROR = 1e-6


# --------------------------------------------------------------------------- numpy


def centred_offsets(kernel: Sequence[int], inner: Sequence[int]) -> tuple[int, ...]:
    """Where a smaller kernel `inner` sits inside `kernel`: `(K - k) // 2` per axis (split_parallel's rule)."""
    return tuple((a - b) // 2 for a, b in zip(kernel, inner))


def chain_filters(g: np.ndarray, depth: int, k2: Sequence[int], width: int, rng: np.random.Generator,
                  groups: int = 1) -> list[np.ndarray]:
    """`depth` filters (first one with g's kernel, the others `k2`) whose chained composition is `g`.

    Repeated NetMorph depth splits: g = F2 (*) F1, then F2 = F3 (*) F2', ... The first filter
    has `width` outputs, the middle ones `width` in and out, the last g's outputs.
    """
    filters: list[np.ndarray] = []
    rest = np.asarray(g, dtype=np.float64)
    for _ in range(depth - 1):
        solution = solvers.solve_deepen(rest, k2, width, rng, groups=groups)
        if solution.residual > MAX_SPLIT_ERROR:
            raise ValueError(f"the depth split is not exact (relative error {solution.residual:.1e})")
        filters.append(solution.f1)
        rest = solution.f2
    filters.append(rest)
    return filters


def split_residual_centred(g: np.ndarray, k1: Sequence[int], width: int, rng: np.random.Generator,
                           groups: int = 1, fraction: float = BRANCH_FRACTION
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`g == M + centred(F2 (*) F1)` with F1 of kernel `k1` (centred in g's kernel), F2 1x1.

    Returns (M, F1, F2): F1 `[width, Ci/groups, *k1]` and F2 `[Co, width/groups, 1...]` are dense
    random orthogonal, scaled so that the branch carries `fraction` of g's norm with equal
    per-element RMS; M (g's kernel and channels) is the dense remainder.
    """
    g = np.asarray(g, dtype=np.float64)
    co, ci_g = g.shape[:2]
    k = tuple(g.shape[2:])
    k1 = tuple(k1)
    cm_g = width // groups
    ones = (1,) * len(k)
    f1 = np.concatenate([solvers.random_orthogonal(cm_g, ci_g * math.prod(k1), rng) for _ in range(groups)])
    f1 = f1.reshape(width, ci_g, *k1)
    f2 = np.concatenate([solvers.random_orthogonal(co // groups, cm_g, rng) for _ in range(groups)])
    f2 = f2.reshape(co, cm_g, *ones)
    path = solvers.compose(f2, f1, groups)
    gnorm, pnorm = float(np.linalg.norm(g)), float(np.linalg.norm(path))
    if gnorm > 0.0 and pnorm > 0.0:
        gain = fraction * gnorm / pnorm
        s = math.sqrt(gain * _rms(f2) / _rms(f1))
        f1, f2 = f1 * s, f2 * (gain / s)
        path = solvers.compose(f2, f1, groups)
    off = centred_offsets(k, k1)
    main = g.copy()
    window = (slice(None), slice(None), *(slice(o, o + s) for o, s in zip(off, k1)))
    main[window] -= path
    return main, f1, f2


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0


def inner_geometry(parent: ConvGeometry, inner: Sequence[int]) -> ConvGeometry:
    """Geometry of a conv with the smaller, centred kernel `inner` that reads what `parent`'s taps read."""
    off = centred_offsets(parent.kernel, inner)
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
    """The parent Conv as the subnet morph sees it."""

    g: np.ndarray
    geometry: ConvGeometry
    dtype: np.dtype
    opset: int
    rank: int
    width: int
    k2: tuple[int, ...]
    kernels: tuple[tuple[int, ...], ...]


def _shown(k: Sequence[int]) -> str:
    return "x".join(map(str, k)) or "1"


@register
class SubnetPass(MorphPass):
    """Morph one Conv layer into a module that computes exactly the same function.

    sequential: L becomes `--depth` convs (repeated NetMorph depth splits; the first keeps L's
    kernel, the others `--kernel`), a P-activation (identity at morph time) after each but the last.
    parallel: L becomes `--branches` convs joined by a Sum, their filters summing to L's (all but one
    random, the last the remainder; `--kernels 1,3,5` gives the branches smaller, centred kernels),
    each branch deepened to `--depth` layers when asked (an Inception-like module).
    residual: L(x) = M(x) + B(x) with B a two-layer branch `conv --kernels[0]` -> P-activation ->
    conv 1x1 and M the dense remainder with L's kernel (Modularized Morphing; the default branch
    1x1 -> 1x1 is the "1c1" module). `--kernels K,K2` with K L's kernel and K2 > 1 grows M's
    kernel to K + K2 - 1 instead.
    Names: `<L>/morph_subnet/conv_<i>` (sequential), `<L>/morph_subnet/branch_<b>/conv_<i>` and
    `<L>/morph_subnet/sum` (parallel), `<L>/morph_subnet/main`, `<L>/morph_subnet/branch/conv_1|2`
    and `<L>/morph_subnet/add` (residual); the module's output keeps L's output tensor name.
    """

    name = "subnet"
    summary = "morph a Conv into a module: a chain, parallel branches, or a residual block"
    params = (
        Param("layer", layer_name, "the Conv layer (node or output name)", metavar="L"),
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
        if layer.op != "Conv":
            return None
        return cls(layer=layer.name, kind="residual")

    # ------------------------------------------------------------------ checks

    def _plan(self, model: onnx.ModelProto) -> SubnetPlan:
        view = mgraph.read_view(model)
        node = mgraph.find_layer(view, self.layer, ("Conv",))
        label = f"layer '{self.layer}'"
        mgraph.exclusive_constant(node, 1)
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
            k1 = tuple(min(sizes[0], a) if a == 1 else sizes[0] for a in k)
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

    def requires(self, model: onnx.ModelProto) -> None:
        self._plan(model)

    def describe(self, model: onnx.ModelProto) -> dict[str, Any]:
        plan = self._plan(model)
        return {"kind": self.kind, "module": "1c1" if plan.kernels == ((1,) * (plan.rank - 2),) * 2 else
                "x".join(map(str, plan.geometry.kernel))}

    # ------------------------------------------------------------------ rewrite

    def call(self, model: onnx.ModelProto) -> PassResult:
        plan = self._plan(model)
        rng = np.random.default_rng(self.seed)
        graph = mgraph.import_graph(model)
        node = mgraph.find_layer(graph, self.layer, ("Conv",))
        x, y = node.inputs[0], node.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
        namer = mgraph.Namer(graph)
        scope = build.fresh_scope(namer, node.name or y.name, "morph_subnet")
        try:
            if self.kind == "sequential":
                self._chain(graph, namer, scope, x, y, plan, plan.g, plan.geometry, self.depth or 2, bias, rng)
            elif self.kind == "parallel":
                self._parallel(graph, namer, scope, x, y, plan, bias, rng)
            else:
                self._residual(graph, namer, scope, x, y, plan, bias, rng)
        except ValueError as exc:
            raise NotApplicable(f"layer '{self.layer}': {str(exc).splitlines()[0]}") from exc
        return PassResult(mgraph.export_model(graph, like=model), True)

    def _chain(self, graph: gs.Graph, namer: mgraph.Namer, scope: str, x: gs.Tensor, y: gs.Variable | None,
               plan: SubnetPlan, g: np.ndarray, geometry: ConvGeometry, depth: int,
               bias: np.ndarray | gs.Tensor | None, rng: np.random.Generator) -> gs.Variable:
        """Convs computing filter `g` with `geometry` on `x` in `depth` layers; the last writes `y`."""
        filters = chain_filters(g, depth, plan.k2, plan.width, rng, geometry.group)
        geometries = chain_geometries(geometry, depth, plan.k2)
        h = x
        for i, (f, geo) in enumerate(zip(filters, geometries), 1):
            last = i == depth
            # Only the last layer has a bias (L's): the others are zero, so nothing leaks through (carry_bias).
            b = bias if last else np.zeros(f.shape[0])
            h = build.add_layer(graph, namer, scope, f"conv_{i}", h, build.LayerSpec("Conv", f, b, geo),
                                plan.dtype, out=y if last else None)
            if not last:
                h = build.p_activation(graph, namer, f"{scope}/conv_{i}", h, self.activation, f.shape[0], 1,
                                       plan.rank, plan.dtype, plan.opset)
        return h

    def _parallel(self, graph: gs.Graph, namer: mgraph.Namer, scope: str, x: gs.Tensor, y: gs.Variable,
                  plan: SubnetPlan, bias: gs.Tensor | None, rng: np.random.Generator) -> None:
        # split_parallel works on the [Co, Ci/groups] filter as is: every branch keeps L's groups.
        parts = solvers.split_parallel(plan.g, plan.kernels, rng)
        outputs = []
        for b, (part, kernel) in enumerate(zip(parts, plan.kernels), 1):
            branch_x, geometry = crop_input(graph, namer, f"{scope}/branch_{b}", x,
                                            inner_geometry(plan.geometry, kernel), plan.opset)
            last = b == len(parts)
            branch_bias = bias if last else None
            outputs.append(self._chain(graph, namer, f"{scope}/branch_{b}", branch_x, None, plan, part, geometry,
                                       self.depth or 1, branch_bias, rng))
        graph.nodes.append(gs.Node("Sum", name=namer(scope, "sum"), inputs=outputs, outputs=[y]))

    def _residual(self, graph: gs.Graph, namer: mgraph.Namer, scope: str, x: gs.Tensor, y: gs.Variable,
                  plan: SubnetPlan, bias: gs.Tensor | None, rng: np.random.Generator) -> None:
        k1, kb = plan.kernels
        groups = plan.geometry.group
        branch_x = x
        if any(k != 1 for k in kb):
            main, f1, f2 = solvers.split_residual(plan.g, kb, plan.width, rng, groups=groups,
                                                  branch_fraction=BRANCH_FRACTION)
            g1, g2 = build.pair_geometries(plan.geometry, kb)
            main_geometry = ConvGeometry(main.shape[2:], g1.pads_begin, g1.pads_end, plan.geometry.strides,
                                         plan.geometry.dilations, groups)
        else:
            main, f1, f2 = split_residual_centred(plan.g, k1, plan.width, rng, groups=groups)
            main_geometry = plan.geometry
            branch_x, g1 = crop_input(graph, namer, f"{scope}/branch", x, inner_geometry(plan.geometry, k1),
                                      plan.opset)
            nd = plan.rank - 2
            g2 = ConvGeometry((1,) * nd, (0,) * nd, (0,) * nd, (1,) * nd, (1,) * nd, groups)
        main_out = build.add_layer(graph, namer, scope, "main", x, build.LayerSpec("Conv", main, bias, main_geometry),
                                   plan.dtype)
        branch = f"{scope}/branch"
        h = build.add_layer(graph, namer, branch, "conv_1", branch_x,
                            build.LayerSpec("Conv", f1, np.zeros(f1.shape[0]), g1), plan.dtype)
        h = build.p_activation(graph, namer, f"{branch}/conv_1", h, self.activation, f1.shape[0], 1, plan.rank,
                               plan.dtype, plan.opset)
        h = build.add_layer(graph, namer, branch, "conv_2", h, build.LayerSpec("Conv", f2, np.zeros(f2.shape[0]), g2),
                            plan.dtype)
        graph.nodes.append(gs.Node("Add", name=namer(scope, "add"), inputs=[main_out, h], outputs=[y]))
