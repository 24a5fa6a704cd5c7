"""The moe morph: a dense FFN upcycled into a top-k routed mixture of experts, or an MoE grown to more experts, exactly.

Upcycling (MORPHS.md section 9): every expert is a copy of the FFN (or of one shard of its hidden
units), a new router picks the top k per token, and the chosen weights carry total weight 1, so
the mixture is the FFN whatever the router. The graph evaluates every expert (dense):

    logits = MatMul(x, W_router) -> TopK(k) -> Softmax over the k chosen (or Softmax, then TopK)
    -> ScatterElements into zeros [.., E] -> Split into E gates -> sum of gate_e * expert_e(x)

Growing an MoE that routes top-k of E (Mixtral, Qwen-MoE exports): every expert is replicated m
times with its router row, and k becomes m*k; the copies of an expert share its logit, so top-(m*k)
picks all copies of the experts top-k picked, with the same total weight.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph.analysis import blocks as mblocks
from onnxmorph.analysis import experts as mexperts
from onnxmorph.contract.passinfra import SEED, MorphPass, Param, PassResult, positive_int
from onnxmorph.contract.registry import register
from onnxmorph.errors import NotApplicable, UsageError
from onnxmorph.graph import core as mgraph
from onnxmorph.graph.core import LayerInfo
from onnxmorph.numerics import experts as nexperts

log = logging.getLogger("onnxmorph")

MIN_OPSET = 11  # ScatterElements; TopK with K as an input and its tie rule (lower index first)
MAX_EXPERTS = 4096


def _non_negative_float(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError("expected a finite number >= 0")
    return number


def _experts(value: Any) -> int:
    number = positive_int(value)
    if number > MAX_EXPERTS:
        raise UsageError(f"expected at most {MAX_EXPERTS} experts, got {number}")
    return number


def _ffn_ref(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise UsageError(f"expected an FFN (block index, module path or one of its layers), got {value!r}")
    if isinstance(value, int) and value < 0:
        raise UsageError(f"expected a block index from 0, got {value}")
    return str(value)


# --------------------------------------------------------------------------- finding the FFN or MoE


def _listing(items: list, what: str) -> str:
    names = ", ".join(f"{i.name}" + (f" (block {i.block})" if i.block is not None else "") for i in items[:8])
    more = f", ... ({len(items)} in all)" if len(items) > 8 else ""
    return f"{what}: {names}{more}" if items else f"no {what} found"


def find_target(analysis: mgraph.Analysis, ref: str) -> mexperts.FFN | mexperts.MoE:
    """The FFN or MoE named by `ref`: a block index or module, the FFN's or MoE's module, or one of its nodes."""
    ffns = mexperts.model_ffns(analysis)
    moes = mexperts.model_moes(analysis)
    if ref.isdigit():
        index = int(ref)
        found = [m for m in moes if m.block == index] or [f for f in ffns if f.block == index]
        if len(found) == 1:
            return found[0]
        if found:
            raise UsageError(f"block {index} holds {len(found)} FFNs ({', '.join(f.name for f in found)}); name one "
                             "by its module or a layer")
        unrouted = [(w, how) for block, w, how in mexperts.unrouted_experts(analysis) if block == index]
        if unrouted:
            weight, how = unrouted[0]
            raise NotApplicable(
                f"block {index} holds stacked expert weights '{weight.name}' {list(weight.shape)} picked by {how}, "
                "not by a TopK over a router's outputs: a routing moe cannot grow exactly (it grows top-k routing: "
                "router -> Softmax -> TopK, as Mixtral and Qwen-MoE export)")
        raise UsageError(f"no FFN or MoE in block {index} ({_listing(ffns, 'FFNs')}; `inspect` lists them)")
    for moe in moes:
        if ref in (moe.module, moe.router.name, moe.router.outputs[0].name, moe.topk.name):
            return moe
    for ffn in ffns:
        if ref == ffn.module or any(ref in (n.name, n.outputs[0].name) for n in ffn.layers):
            return ffn
    for moe in moes:
        if any(ref in (n.name, *(t.name for t in n.outputs)) for n in moe.nodes):
            return moe
    inside = [f for f in ffns if f.module and f.module.startswith(ref + ".")]
    inside += [m for m in moes if m.module and (m.module == ref or m.module.startswith(ref + "."))]
    if len(inside) == 1:
        return inside[0]
    try:
        node = mgraph.find_node(analysis.view, ref)
    except UsageError:
        raise UsageError(f"no FFN '{ref}' ({_listing(ffns, 'FFNs')}; `inspect` lists them)") from None
    raise NotApplicable(f"'{node.name}' ({node.op}) is not in an FFN: no down projection whose input is made unit by "
                        "unit from inner projections of one tensor reads it")


# --------------------------------------------------------------------------- plans


@dataclass
class UpcyclePlan:
    ffn: str  # the down projection's name (found again in the editable graph)
    name: str
    layout: nexperts.Layout
    units: mexperts.Units | None
    noise_part: mexperts.Part | None
    dtype: np.dtype
    width: int  # the FFN's input features


@dataclass
class GrowPlan:
    router: str  # the router layer's name (found again in the editable graph)
    name: str
    factor: int  # every expert replicated this many times
    experts: int
    top_k: int
    shapes: list[tuple[str, int, np.ndarray]]  # (node, input, new values) of shape constants that name k or E
    noise: float
    reason: str


def _weight(node: gs.Node) -> np.ndarray:
    return mgraph.values(node.inputs[1])


def _out_axis(node: gs.Node) -> int:
    """The axis of a 2-d layer weight that holds its output features."""
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1


def _noise_problem(ffn: mexperts.FFN, units: mexperts.Units | str) -> str | None:
    if isinstance(units, str):
        return f"the FFN's hidden units are not traced unit by unit ({units})"
    if units.scalable:
        return None
    kind = "gated (act(gate) * up) with both factors non-linear in their rows" if units.gated else \
        f"not gated and its activation ({', '.join(ffn.activations) or 'none'}) is not relu-like"
    return (f"FFN '{ffn.name}' is {kind}: no rescaling of an expert's hidden units keeps it equal to the FFN, and "
            "noise cancelling in pairs of experts is exact only when both are always chosen with equal weights, "
            "which top-k routing does not do; the random router alone breaks the experts' symmetry (use --noise 0)")


def _read_outside(graph: gs.Graph, nodes: list[gs.Node], ends: set[str]) -> tuple[str, str] | None:
    """(a tensor `nodes` make, other than `ends`, and who reads it) when a graph output or a node outside reads it."""
    inside = {id(n) for n in nodes}
    outputs = {t.name for t in graph.outputs}
    for node in nodes:
        for tensor in node.outputs:
            if tensor.name in ends:
                continue
            if tensor.name in outputs:
                return tensor.name, "a graph output"
            reader = next((r for r in tensor.outputs if id(r) not in inside), None)
            if reader is not None:
                return tensor.name, f"read by '{reader.name}' ({reader.op}), outside it"
    return None


def _reaches_output(graph: gs.Graph, starts: list[gs.Tensor], stops: set[str]) -> str | None:
    """A graph output computed from `starts` other than through the tensors `stops` (sizes read by Shape/Size do not
    count: they are the tokens' count, which growing keeps), or None."""
    outputs = {t.name for t in graph.outputs}
    seen: set[str] = set()
    stack = [t for t in starts if t.name not in stops]
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in outputs:
            return tensor.name
        stack.extend(out for reader in tensor.outputs if reader.op not in ("Shape", "Size")
                     for out in reader.outputs if out.name not in stops)
    return None


def _representable(values: np.ndarray, dtype: np.dtype, flag: str, value: float, where: str) -> np.ndarray:
    """`values` as `dtype`, or UsageError naming `flag` when an entry overflows it or a non-zero one underflows to 0.

    A large --noise or --router-std makes factors (exp(noise * z)) or weights that a float32 model cannot
    hold: the mixture would be infinite or lose units, so it is refused before verification, in one line.
    """
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        cast = np.asarray(values).astype(dtype)
        lost = np.any(cast == 0) and bool(np.any((cast == 0) & (np.asarray(values) != 0)))
    if not np.all(np.isfinite(cast)) or lost:
        problem = "overflow" if not np.all(np.isfinite(cast)) else "underflow to 0"
        raise UsageError(f"{where}: {flag} {value:g} makes weights that {np.dtype(dtype).name} cannot hold (they "
                         f"{problem}); use a smaller {flag}")
    return cast


@register
class MoEPass(MorphPass):
    """Turn a transformer's FFN into a top-k mixture of E experts that computes the same function (upcycling).

    Every expert starts as a copy of the FFN; a new router (a MatMul of the FFN's input) picks the top
    k experts per token. topk-softmax routing (the default) weights the chosen k by a softmax over
    their logits: the weights sum to 1, so the mixture equals the FFN whatever the router, which
    starts random. softmax-topk keeps softmax probabilities over all E: exact only from a zero router,
    with the gates scaled by E/k. --shards S splits the FFN's hidden units into S shards (fine-grained
    experts, E/S copies of each) with one routing group per shard (top-k of its copies): exact for any
    router. With E = S (one expert per shard) the FFN is the sum of all shards: exact only with every
    shard active (--top-k E) and weights E x softmax from a zero router; top-k < E is refused.
    --shared-expert adds an always-active expert whose output projection starts at zero. --noise
    rescales each copy's hidden units (rows of the projection in which a unit is linear, e.g. up in a
    gated FFN, or any projection before a relu-like activation, by s > 0; the down projection's
    columns by 1/s): exact, and refused where no such projection exists (a GELU FFN such as GPT-2's).
    The graph evaluates every expert (dense), costing E/S times the FFN's FLOPs; top-k routing needs
    k/S of them per token.

    Given an existing MoE (router -> TopK over E experts, stacked expert weights, as Mixtral and
    Qwen-MoE export), --experts m*E --top-k m*k replicates every expert and its router row m times
    (exact: the copies share their expert's logit and weight); --noise (default 0.1 there) rescales
    the copies' up rows so that they can separate under training. Any other growth is refused.
    """

    name = "moe"
    summary = "turn an FFN into a top-k mixture of experts (upcycling), or grow an MoE, exactly"
    params = (
        Param("layer", _ffn_ref, "the FFN: its block index, module path or one of its layers; or an existing MoE "
              "(inspect lists them)", metavar="FFN"),
        Param("experts", _experts, "number of experts E", metavar="E"),
        Param("top_k", positive_int, "experts chosen per token (per shard group with --shards)", metavar="K"),
        Param("shards", positive_int, "split the FFN's hidden units into S shards, E/S copies of each (fine-grained "
              "experts); exact with one routing group per shard, or with E = S all active (--top-k E)",
              default=1, metavar="S"),
        Param("routing", str, "topk-softmax: softmax over the k chosen logits (exact with any router); "
              "softmax-topk: softmax over all, top k kept (exact from a zero router, gates x E/k)",
              default="topk-softmax", choices=nexperts.ROUTINGS),
        Param("router", str, "the router's start: random or zero (default: random where exact, else zero)",
              default=None, choices=nexperts.ROUTERS),
        Param("router_std", _non_negative_float, "standard deviation of a random router's weights", default=0.02,
              metavar="X"),
        Param("shared_expert", str, "add an always-active shared expert whose output projection starts at zero; its "
              "other weights a copy of the FFN's or random", default="none", choices=nexperts.SHARED),
        Param("noise", _non_negative_float, "rescale each copy's hidden units by exp(X * N(0,1)) where an exact "
              "compensation exists (default 0; 0.1 when growing an MoE)", default=None, metavar="X"),
        SEED,
    )

    @classmethod
    def probe(cls, model: mgraph.ModelOrAnalysis, layer: LayerInfo) -> MorphPass | None:
        """For `inspect`: the FFN whose down projection is `layer` (4 experts, top-2)."""
        analysis = mgraph.analysis(model)
        for ffn in mexperts.model_ffns(analysis):
            if ffn.down.name == layer.name:
                return cls(layer=layer.name, experts=4, top_k=2)
        return None

    def describe(self, plan: UpcyclePlan | GrowPlan) -> dict[str, Any]:
        if isinstance(plan, GrowPlan):
            return {"moe": plan.name, "grow": f"x{plan.factor}"}
        return {"ffn": plan.name}

    def new_weights(self, model: onnx.ModelProto) -> tuple[int, int]:
        try:
            analysis = mgraph.analysis(model)
            target = find_target(analysis, str(self.layer))
        except Exception:  # requires() says why
            return 0, 0
        if isinstance(target, mexperts.MoE):
            total = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in target.stacked)
            factor = max(1, self.experts // max(target.experts, 1))
            return total * (factor - 1), 0
        size = sum(int(np.prod(n.inputs[1].shape)) * np.dtype(n.inputs[1].dtype).itemsize for n in target.layers)
        copies = self.experts + (self.shared_expert != "none")
        router = mexperts.in_features(target.inner[0])
        return size * copies // max(self.shards, 1) + router * self.experts * 4, len(target.layers) * copies

    # ----------------------------------------------------------------- requires

    def requires(self, model: mgraph.ModelOrAnalysis) -> UpcyclePlan | GrowPlan:
        analysis = mgraph.analysis(model)
        if mgraph.opset(analysis) < MIN_OPSET:
            raise NotApplicable(f"the router needs opset {MIN_OPSET} (ScatterElements, TopK with its tie rule); the "
                                f"model has opset {mgraph.opset(analysis)}")
        target = find_target(analysis, str(self.layer))
        if isinstance(target, mexperts.MoE):
            return self._grow_plan(analysis, target)
        return self._upcycle_plan(analysis, target)

    def _upcycle_plan(self, analysis: mgraph.Analysis, ffn: mexperts.FFN) -> UpcyclePlan:
        try:
            layout = nexperts.plan_layout(self.experts, self.top_k, self.shards, self.routing, self.router,
                                          ffn.hidden)
        except ValueError as exc:
            raise NotApplicable(f"FFN '{ffn.name}': {exc}") from None
        nested = [n.name for n in ffn.nodes if any(isinstance(v, gs.Graph) for v in n.attrs.values())]
        if nested:
            raise NotApplicable(f"FFN '{ffn.name}': node '{nested[0]}' holds a subgraph; it is not copied")
        dtypes = {np.dtype(n.inputs[1].dtype) for n in ffn.layers}
        if len(dtypes) != 1 or next(iter(dtypes)).kind != "f":
            raise NotApplicable(f"FFN '{ffn.name}': its projections' weights are not of one float type")
        dtype = next(iter(dtypes))
        shapes = analysis.shapes
        rank_in, rank_out = shapes.get(ffn.input.name), shapes.get(ffn.output.name)
        if rank_in is not None and rank_out is not None and len(rank_in) != len(rank_out):
            raise NotApplicable(f"FFN '{ffn.name}': its output '{ffn.output.name}' has rank {len(rank_out)}, its "
                                f"input '{ffn.input.name}' rank {len(rank_in)}: the gates cannot weight it")
        noise = self.noise or 0.0
        units: mexperts.Units | str | None = None
        if layout.shards > 1 or noise > 0:
            units = mexperts.unit_structure(ffn, shapes)
        if layout.shards > 1 and isinstance(units, str):
            raise NotApplicable(f"FFN '{ffn.name}': --shards needs its hidden units made unit by unit: {units}")
        if layout.shards > 1:
            # Shard 0 is the FFN's own nodes with a shard's weights: a reader outside the FFN would see the shard.
            escape = _read_outside(analysis.view, ffn.nodes, {ffn.output.name})
            if escape is not None:
                raise NotApplicable(f"FFN '{ffn.name}': its tensor '{escape[0]}' is {escape[1]}; --shards makes the "
                                    "FFN's own nodes the first shard, which that reader would see (use --shards 1)")
        noise_part = None
        if noise > 0:
            problem = _noise_problem(ffn, units)  # type: ignore[arg-type]
            if problem is not None:
                raise NotApplicable(f"--noise: {problem}")
            noise_part = units.scalable[0]  # type: ignore[union-attr]
        width = mexperts.in_features(ffn.inner[0])
        return UpcyclePlan(ffn.down.name, ffn.name, layout, units if isinstance(units, mexperts.Units) else None,
                           noise_part, dtype, width)

    def _grow_plan(self, analysis: mgraph.Analysis, moe: mexperts.MoE) -> GrowPlan:
        name = f"MoE '{moe.name}'"
        E, k = moe.experts, moe.top_k
        if moe.form != "stacked":
            raise NotApplicable(f"{name} weights whole FFNs (a dense mixture): grow it by upcycling its parent FFN "
                                "to more experts instead")
        if k is None:
            raise NotApplicable(f"{name}: its TopK's k '{moe.topk.inputs[1].name}' is computed, not a constant")
        extra = [p for p in ("shards", "shared_expert", "router") if self.config[p] not in (1, "none", None)]
        if extra or self.routing != "topk-softmax":
            raise UsageError(f"{name}: --{(extra or ['routing'])[0].replace('_', '-')} applies to upcycling a dense "
                             "FFN; growing an MoE keeps its own routing")
        factor = self.experts // E
        if self.experts % E or factor < 2 or self.top_k != factor * k:
            raise NotApplicable(
                f"{name} routes top-{k} of {E}: it grows exactly only to m*{E} experts with top-(m*{k}) (every expert "
                f"and its router row replicated m times: the copies share its logit, so top-(m*{k}) picks all copies "
                f"of the {k} experts top-{k} picks, with the same total weight), not {self.experts} with top-"
                f"{self.top_k}; more experts at top-{k} change which experts are chosen, except experts whose logit "
                "can never win, which are exact but never chosen and so never trained")
        if moe.routing not in ("softmax-topk", "softmax-topk-renormalised", "topk-softmax"):
            raise NotApplicable(f"{name}: its routing ({moe.routing}: no softmax over the logits) does not keep an "
                                "expert's total weight when its logit is shared by copies")
        if moe.router.op == "Gemm" and moe.router.attrs.get("transA", 0):
            raise NotApplicable(f"{name}: its router '{moe.router.name}' is a Gemm with transA")
        end = {moe.combine.outputs[0].name} if moe.combine is not None else set()
        escape = _reaches_output(analysis.view, moe.router.outputs, end)
        if escape is not None:
            raise NotApplicable(f"{name}: the graph output '{escape}' is computed from its router's logits other than "
                                "through the mixture (router logits or chosen experts as an output?); growing gives "
                                "them m times as many experts or slots, which that output would show")
        shapes = self._shape_constants(analysis, moe, factor)
        noise = 0.1 if self.noise is None else self.noise
        if noise > 0:
            units = mexperts.stacked_units(moe, analysis.shapes)
            if isinstance(units, str) or not units.units.scalable:
                why = units if isinstance(units, str) else "no projection in which its hidden units are linear"
                raise NotApplicable(f"--noise: {why}; without it the copies of an expert are always chosen together "
                                    "with equal weights and stay equal under training (--noise 0 to grow anyway)")
        reason = (f"every expert and its router row replicated {factor} times: the copies share their expert's logit, "
                  f"so top-{factor * k} picks all copies of the top-{k} experts with the same total weight")
        return GrowPlan(moe.router.name, moe.name, factor, E * factor, k * factor, shapes, noise, reason)

    @staticmethod
    def _shape_constants(analysis: mgraph.Analysis, moe: mexperts.MoE,
                         factor: int) -> list[tuple[str, int, np.ndarray]]:
        """The constant shapes in the MoE that name k or E (dynamo writes them out), scaled by `factor`.

        A size equal to k or E can only be told from another size with its value: refused when k or E
        equals one of the experts' other sizes, or k is 1 (a 1 is also every unit axis).
        """
        E, k = moe.experts, moe.top_k or 0
        other = {int(d) for w in moe.stacked for d in w.shape[1:]} | {mexperts.in_features(moe.router)}
        found = []
        for node in moe.nodes:
            k_in = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0}.get(node.op)
            if k_in is None or len(node.inputs) <= k_in or not isinstance(node.inputs[k_in], gs.Constant):
                continue
            values = np.asarray(mgraph.values(node.inputs[k_in])).astype(np.int64).reshape(-1)
            named = [v for v in values.tolist() if v in (k, E)]
            if not named:
                continue
            clash = sorted({v for v in named if v in other or v == 1})
            if clash:
                raise NotApplicable(f"MoE '{moe.name}': the constant shape '{node.inputs[k_in].name}' of '{node.name}' "
                                    f"holds {clash[0]}, which is k or E and also another size: which entries count "
                                    "experts cannot be told")
            new = np.where(np.isin(values, [k, E]), values * factor, values)
            found.append((node.name, k_in, new.reshape(np.asarray(mgraph.values(node.inputs[k_in])).shape)))
        return found

    # ----------------------------------------------------------------- call

    def call(self, model: mgraph.ModelOrAnalysis, plan: UpcyclePlan | GrowPlan) -> PassResult:
        model = mgraph.model_of(model)
        graph = mgraph.import_graph(model)
        if isinstance(plan, GrowPlan):
            _grow(graph, model, plan, np.random.default_rng(self.seed))
            return PassResult(mgraph.export_model(graph, like=model), True)
        shapes = mgraph.analysis(model).shapes
        ffn = next((f for f in mexperts.ffns(graph, mblocks.node_modules(model), shapes=shapes)
                    if f.down.name == plan.ffn), None)
        if ffn is None:  # the plan was made on the read view of this very model
            raise NotApplicable(f"FFN '{plan.name}' was not found again in the editable graph (a bug in onnxmorph)")
        _Upcycler(graph, ffn, plan, self, shapes).build()
        return PassResult(mgraph.export_model(graph, like=model), True)


# --------------------------------------------------------------------------- building the mixture


class _Upcycler:
    """Builds the experts, the router and the weighted sum in an editable graph."""

    def __init__(self, graph: gs.Graph, ffn: mexperts.FFN, plan: UpcyclePlan, step: MoEPass, shapes: dict) -> None:
        self.graph, self.ffn, self.plan, self.step, self.shapes = graph, ffn, plan, step, shapes
        self.namer = mgraph.Namer(graph)
        self.scope = mgraph.fresh_scope(self.namer, f"{ffn.module or ffn.down.name}/morph_moe")
        self.rng = np.random.default_rng(step.seed)
        self.made: list[gs.Node] = []
        # copies are named after the FFN's own nodes less their common path: expert_1/c_fc/Gemm
        names = [n.name for n in ffn.nodes if n.name]
        common = os.path.commonprefix(names) if len(names) > 1 else ""
        self.prefix = common[:common.rfind("/") + 1] if "/" in common else ""

    def name(self, *parts: str) -> str:
        return self.namer(self.scope, *parts)

    def short(self, name: str) -> str:
        return (name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name).strip("/")

    # -- copies of the FFN

    def copy(self, tag: str) -> dict[str, Any]:
        """A copy of the FFN's nodes reading its input; float weights are the copy's own. Returns old name -> new."""
        tensors: dict[str, gs.Tensor] = {self.ffn.input.name: self.ffn.input}
        nodes: dict[str, gs.Node] = {}
        for node in self.ffn.nodes:
            inputs = []
            for t in node.inputs:
                if t.name in tensors:
                    inputs.append(tensors[t.name])
                elif isinstance(t, gs.Constant) and np.dtype(t.dtype).kind == "f" and int(np.prod(t.shape)) > 1:
                    new = mgraph.constant(self.name(tag, self.short(t.name)), mgraph.values(t), mgraph.values(t).dtype)
                    tensors[t.name] = new
                    inputs.append(new)
                else:
                    inputs.append(t)  # outer activations, shapes and scalar constants are shared
            outputs = []
            for out in node.outputs:
                # a shard's tensors are narrower than the FFN's: shapes are left to inference
                shape = out.shape if out is self.ffn.output or self.plan.layout.shards == 1 else None
                new = gs.Variable(self.name(tag, self.short(out.name)), dtype=out.dtype, shape=shape)
                tensors[out.name] = new
                outputs.append(new)
            copy = gs.Node(node.op, self.name(tag, self.short(node.name or node.op)), attrs=dict(node.attrs),
                           inputs=inputs, outputs=outputs, domain=node.domain)
            self.graph.nodes.append(copy)
            self.made.append(copy)
            nodes[node.name] = copy
        return {"tensors": tensors, "nodes": nodes}

    def original(self) -> dict[str, Any]:
        tensors = {t.name: t for n in self.ffn.nodes for t in n.outputs}
        tensors[self.ffn.input.name] = self.ffn.input
        return {"tensors": tensors, "nodes": {n.name: n for n in self.ffn.nodes}}

    # -- weights of one expert

    def _rows(self, shard: int) -> dict[str, np.ndarray]:
        """Inner layer -> the output rows (its features) that shard `shard` keeps, in order."""
        units = self.plan.units
        layout = self.plan.layout
        if layout.shards == 1 or units is None:
            return {}
        a, b = nexperts.shard_ranges(units.hidden, layout.shards)[shard]
        rows: dict[str, list[int]] = {}
        for part in sorted(units.parts, key=lambda p: (p.layer, p.offset)):
            rows.setdefault(part.layer, []).extend(range(part.offset + a, part.offset + b))
        return {k: np.asarray(v) for k, v in rows.items()}

    def set_expert(self, nodes: dict[str, gs.Node], shard: int, scales: np.ndarray | None,
                   zero_output: bool = False, random_inner: bool = False) -> None:
        ffn, layout, units = self.ffn, self.plan.layout, self.plan.units
        rows = self._rows(shard)
        sharded = bool(rows)
        a, b = nexperts.shard_ranges(ffn.hidden, layout.shards)[shard] if sharded else (0, ffn.hidden)
        position = {layer: {int(r): i for i, r in enumerate(idx)} for layer, idx in rows.items()}
        part = self.plan.noise_part
        scaled_rows = set(range(part.offset + a, part.offset + b)) if part is not None and scales is not None \
            else set()
        for layer in ffn.inner:
            node = nodes[layer.name]
            w = np.asarray(_weight(node), np.float64)
            axis = _out_axis(node)
            keep = rows.get(layer.name, np.arange(w.shape[axis]))
            w = np.take(w, keep, axis=axis)
            if random_inner:
                w = self.rng.normal(0.0, float(w.std()) or 0.02, w.shape)
            if scaled_rows and layer.name == part.layer:  # type: ignore[union-attr]
                factor = np.array([scales[r - part.offset - a] if r in scaled_rows else 1.0  # type: ignore
                                   for r in keep])
                shape = [1, 1]
                shape[axis] = -1
                w = self.noisy(w * factor.reshape(shape), node)
            self.install(node, 1, w)
        for owner, k, layer, first, length in (units.constants if units is not None else []):
            node = nodes[owner.name]
            c = np.asarray(mgraph.values(node.inputs[k]), np.float64)
            tensor_rows = np.arange(first, first + length)
            if layer in rows:
                keep_pos = np.array([i for i, r in enumerate(tensor_rows) if int(r) in position[layer]])
                c = np.take(c, keep_pos, axis=-1)
                tensor_rows = tensor_rows[keep_pos]
            additive = node.op in ("Add", "Sub") or (node.op == "Gemm" and k == 2)
            if scaled_rows and additive and layer == part.layer:  # type: ignore[union-attr]
                factor = np.array([scales[r - part.offset - a] if r in scaled_rows else 1.0  # type: ignore
                                   for r in tensor_rows])
                c = self.noisy(c * factor.reshape((1,) * (c.ndim - 1) + (-1,)), node, k)
            self.install(node, k, c)
        for split in (units.splits if units is not None and sharded else []):
            self._shrink_split(nodes[split.name], layout.shards)
        for reshape, length in (units.reshapes if units is not None and sharded else []):
            self._shrink_reshape(nodes[reshape.name], length // layout.shards)
        down = nodes[ffn.down.name]
        w = np.asarray(_weight(down), np.float64)
        in_axis = 1 - _out_axis(down)
        w = np.take(w, np.arange(a, b), axis=in_axis)
        if scaled_rows:
            shape = [1, 1]
            shape[in_axis] = -1
            w = self.noisy(w / scales.reshape(shape), down)  # type: ignore[union-attr]
        if zero_output:
            w = np.zeros_like(w)
        self.install(down, 1, w)
        share = 0.0 if zero_output else 1.0 / layout.shards
        if share != 1.0:
            for node, k in self._output_biases(nodes):
                self.install(node, k, np.asarray(mgraph.values(node.inputs[k]), np.float64) * share)

    def noisy(self, values: np.ndarray, node: gs.Node, k: int = 1) -> np.ndarray:
        """Rescaled weights, checked to fit their dtype (a large --noise overflows them)."""
        return _representable(values, np.dtype(node.inputs[k].dtype), "--noise", self.step.noise or 0.0,
                              f"FFN '{self.plan.name}'")

    def install(self, node: gs.Node, k: int, array: np.ndarray) -> None:
        """A new weight for input `k` of `node`, in that input's dtype; a weight other nodes read keeps its own."""
        old = node.inputs[k]
        shared = any(n is not node for n in old.outputs)
        name = self.name("weights", old.name.strip("/")) if shared else old.name
        mgraph.set_input_constant(node, k, array, name=name)

    def _output_biases(self, nodes: dict[str, gs.Node]) -> list[tuple[gs.Node, int]]:
        """The additive constants from the down projection to the FFN's output (its bias, bias Adds)."""
        found = []
        down = self.ffn.down
        if down.op == "Gemm" and len(down.inputs) > 2 and isinstance(down.inputs[2], gs.Constant):
            found.append((nodes[down.name], 2))
        tensor = down.outputs[0]
        while tensor is not self.ffn.output:
            node = next(n for n in tensor.outputs if n.op not in ("Shape", "Size"))
            if node.op in ("Add", "Sub"):
                k = next(i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant))
                found.append((nodes[node.name], k))
            tensor = node.outputs[0]
        return found

    def _shrink_reshape(self, node: gs.Node, length: int) -> None:
        """A Reshape whose target ends in the units' count, retargeted to a shard's count."""
        target = node.inputs[1]
        source = mgraph.producer(target)
        if isinstance(target, gs.Constant):
            values = np.array(mgraph.values(target), np.int64)
            values[-1] = length
            node.inputs[1] = mgraph.constant(self.name("reshape_target"), values, np.int64)
        elif source is not None and source.op == "Concat" and isinstance(source.inputs[-1], gs.Constant) \
                and int(np.asarray(mgraph.values(source.inputs[-1])).reshape(-1)[-1]) > 0:
            values = np.array(mgraph.values(source.inputs[-1]), np.int64).reshape(-1)
            values[-1] = length
            concat = gs.Node("Concat", self.name("reshape_target"), attrs=dict(source.attrs),
                             inputs=[*source.inputs[:-1], mgraph.constant(self.name("reshape_last"), values,
                                                                          np.int64)],
                             outputs=[gs.Variable(self.name("reshape_target", "output"), dtype=np.int64)])
            self.graph.nodes.append(concat)
            self.made.append(concat)
            node.inputs[1] = concat.outputs[0]
        else:  # the target's other entries, then the shard's count
            zero = mgraph.constant(self.name("reshape_start"), np.asarray([0], np.int64), np.int64)
            last = mgraph.constant(self.name("reshape_end"), np.asarray([-1], np.int64), np.int64)
            head = gs.Variable(self.name("reshape_head"), dtype=np.int64)
            self.graph.nodes.append(gs.Node("Slice", self.name("reshape_slice"), inputs=[target, zero, last],
                                            outputs=[head]))
            tail = mgraph.constant(self.name("reshape_count"), np.asarray([length], np.int64), np.int64)
            out = gs.Variable(self.name("reshape_target"), dtype=np.int64)
            self.graph.nodes.append(gs.Node("Concat", self.name("reshape_concat"), attrs={"axis": 0},
                                            inputs=[head, tail], outputs=[out]))
            self.made.extend(self.graph.nodes[-2:])
            node.inputs[1] = out

    def _shrink_split(self, node: gs.Node, shards: int) -> None:
        """A Split/Slice that separates a fused projection's parts, cut to a shard's size."""
        if node.op == "Split":
            sizes = node.attrs.get("split")
            if sizes is not None:
                node.attrs["split"] = [int(s) // shards for s in sizes]
            elif len(node.inputs) > 1 and node.inputs[1].name:
                values = mexperts.int_values(node.inputs[1], self.shapes)
                mgraph.set_input_constant(node, 1, np.asarray([int(v) // shards for v in values], np.int64),
                                          name=self.name("split_sizes"))
            return
        for k in (1, 2):
            values = mexperts.int_values(node.inputs[k], self.shapes)
            if values and values[0] is not None and abs(values[0]) < 2 ** 62:
                node.inputs[k] = mgraph.constant(self.name("slice", "starts" if k == 1 else "ends"),
                                                 np.asarray([values[0] // shards], np.int64), np.int64)

    # -- router and mixture

    def node(self, op: str, tag: str, inputs: list[gs.Tensor], outputs: int = 1, dtype: Any = None,
             **attrs: Any) -> list[gs.Variable]:
        outs = [gs.Variable(self.name(tag, f"output_{k}" if outputs > 1 else "output"), dtype=dtype)
                for k in range(outputs)]
        node = gs.Node(op, self.name(tag), attrs=attrs, inputs=inputs, outputs=outs)
        self.graph.nodes.append(node)
        self.made.append(node)
        return outs

    def gates(self, group: nexperts.Group, g: int, weights: np.ndarray) -> list[gs.Tensor]:
        """The group's gate per expert ([.., 1] each): router, TopK, softmax, scatter, split."""
        layout, dtype = self.plan.layout, self.plan.dtype
        tag = "router" if len(layout.groups) == 1 else f"router_{g}"
        w = mgraph.constant(self.name(tag, "weight"), weights, dtype)
        (logits,) = self.node("MatMul", tag, [self.ffn.input, w], dtype=dtype)
        k = mgraph.constant(self.name(tag, "k"), np.asarray([group.top_k], np.int64), np.int64)
        if layout.routing == "topk-softmax":
            values, index = self.node("TopK", f"{tag}/topk", [logits, k], 2, axis=-1, largest=1, sorted=1)
            (chosen,) = self.node("Softmax", f"{tag}/softmax", [values], dtype=dtype, axis=-1)
        else:
            (probs,) = self.node("Softmax", f"{tag}/softmax", [logits], dtype=dtype, axis=-1)
            chosen, index = self.node("TopK", f"{tag}/topk", [probs, k], 2, axis=-1, largest=1, sorted=1)
        if group.scale != 1.0:
            scale = mgraph.constant(self.name(tag, "scale"), np.asarray(group.scale), dtype)
            (chosen,) = self.node("Mul", f"{tag}/scale", [chosen, scale], dtype=dtype)
        (shape,) = self.node("Shape", f"{tag}/shape", [logits], dtype=np.int64)
        zero = gs.Constant(self.name(tag, "zero"), np.zeros(1, dtype))
        (zeros,) = self.node("ConstantOfShape", f"{tag}/zeros", [shape], dtype=dtype, value=zero)
        (scattered,) = self.node("ScatterElements", f"{tag}/gates", [zeros, index, chosen], dtype=dtype, axis=-1)
        count = len(group.experts)
        if count == 1:
            return [scattered]
        if mgraph.opset(self.graph) >= 13:
            sizes = mgraph.constant(self.name(tag, "split_sizes"), np.ones(count, np.int64), np.int64)
            return self.node("Split", f"{tag}/split", [scattered, sizes], count, dtype=dtype, axis=-1)
        return self.node("Split", f"{tag}/split", [scattered], count, dtype=dtype, axis=-1, split=[1] * count)

    def build(self) -> None:
        ffn, plan, step = self.ffn, self.plan, self.step
        layout = plan.layout
        readers = [n for n in ffn.output.outputs]
        # every copy is made from the parent's FFN before expert 0 (the FFN's own nodes) gets a shard's weights
        experts = [self.original()] + [self.copy(f"expert_{e}") for e in range(1, layout.experts)]
        if layout.shards > 1:
            for node in ffn.nodes:
                for out in node.outputs:
                    if out is not ffn.output:
                        out.shape = None
        shared = self.copy("shared_expert") if step.shared_expert != "none" else None
        outputs: list[gs.Tensor] = []
        for e, nodes in enumerate(experts):
            shard, copy = layout.shard_of(e), layout.copy_of(e)
            scales = None
            if plan.noise_part is not None and (copy > 0 or layout.copies == 1 and e > 0):
                with np.errstate(over="ignore"):  # an infinite factor is refused where it is used (noisy)
                    scales = nexperts.unit_scales(self.rng, ffn.hidden // layout.shards, step.noise or 0.0)
            if layout.shards > 1 or scales is not None:
                self.set_expert(nodes["nodes"], shard, scales)
            outputs.append(nodes["tensors"][ffn.output.name])
        if shared is not None:
            self.set_expert(shared["nodes"], 0, None, zero_output=True, random_inner=step.shared_expert == "random")
            shared = shared["tensors"][ffn.output.name]
        router = _representable(
            nexperts.router_weights(self.rng, plan.width, layout.experts, step.router_std, layout.router),
            np.dtype(plan.dtype), "--router-std", step.router_std, f"FFN '{plan.name}'")
        terms: list[gs.Tensor] = []
        for g, group in enumerate(layout.groups):
            gates = self.gates(group, g, router[:, list(group.experts)])
            for e, gate in zip(group.experts, gates):
                (term,) = self.node("Mul", f"expert_{e}/weighted", [outputs[e], gate], dtype=plan.dtype)
                terms.append(term)
        if shared is not None:
            terms.append(shared)
        (mixed,) = self.node("Sum", "mixture", terms, dtype=plan.dtype)
        renamed = self.name("expert_0", "output") if mgraph.is_graph_output(self.graph, ffn.output) else None
        mixed.shape = ffn.output.shape  # the same shape as the FFN's output, whose place it takes
        mgraph.replace_all_uses(self.graph, ffn.output, mixed, readers, renamed=renamed)
        self._drop_dead()
        log.info("moe: FFN %s -> %d experts (%d shards), top-%d %s routing, router %s%s; exact because %s", plan.name,
                 layout.experts, layout.shards, layout.top_k, layout.routing, layout.router,
                 ", shared expert" if shared is not None else "", layout.reason)

    def _drop_dead(self) -> None:
        """Copied shape computations a shard no longer reads (its Slices now take constants)."""
        outputs = {t.name for t in self.graph.outputs}
        changed = True
        while changed:
            changed = False
            for node in list(self.made):
                if not any(t.outputs or t.name in outputs for t in node.outputs):
                    mgraph.remove_node(self.graph, node)
                    self.made.remove(node)
                    changed = True


# --------------------------------------------------------------------------- growing a stacked MoE


def _grow(graph: gs.Graph, model: onnx.ModelProto, plan: GrowPlan, rng: np.random.Generator) -> None:
    """Replicate every expert `plan.factor` times (copy j of expert e is expert j*E + e) and scale k alike."""
    analysis = mgraph.Analysis(model)
    moe = next((m for m in mexperts.moes(graph, mexperts.ffns(graph)) if m.router.name == plan.router), None)
    if moe is None:
        raise NotApplicable(f"MoE '{plan.name}' was not found again in the editable graph (a bug in onnxmorph)")
    namer = mgraph.Namer(graph)
    scope = mgraph.fresh_scope(namer, f"{plan.name}/morph_moe")
    m, E = plan.factor, moe.experts
    units = mexperts.stacked_units(moe, analysis.shapes) if plan.noise > 0 else None
    tiled: dict[str, np.ndarray] = {}
    for weight in moe.stacked:
        tiled[weight.name] = np.concatenate([np.asarray(mgraph.values(weight))] * m, axis=0)
    if isinstance(units, mexperts.StackedUnits):
        part = units.units.scalable[0]
        up, row_axis = units.weights[part.layer]
        down, column_axis = units.down
        hidden = units.units.hidden
        # copies 1.. of every expert: the up rows of each hidden unit times s > 0, its down columns over s
        scales = np.ones((m * E, hidden))
        with np.errstate(over="ignore"):  # an infinite factor is refused below, where it is used
            scales[E:] = np.exp(plan.noise * rng.standard_normal(((m - 1) * E, hidden)))
        rows = [1] * 3
        rows[0], rows[row_axis] = m * E, hidden
        w = tiled[up.name].astype(np.float64)
        index = [slice(None)] * 3
        index[row_axis] = slice(part.offset, part.offset + hidden)
        with np.errstate(over="ignore", invalid="ignore"):
            w[tuple(index)] *= scales.reshape(rows)
        where = f"MoE '{plan.name}'"
        tiled[up.name] = _representable(w, np.dtype(up.dtype), "--noise", plan.noise, where)
        columns = [1] * 3
        columns[0], columns[column_axis] = m * E, hidden
        tiled[down.name] = _representable(tiled[down.name].astype(np.float64) / scales.reshape(columns),
                                          np.dtype(down.dtype), "--noise", plan.noise, where)
    replaced: dict[str, gs.Constant] = {}
    for weight in moe.stacked:
        replaced[weight.name] = mgraph.constant(namer(scope, weight.name.strip("/")), tiled[weight.name],
                                                np.dtype(weight.dtype))
    for node in moe.nodes:
        for i, t in enumerate(node.inputs):
            if t.name in replaced:
                node.inputs[i] = replaced[t.name]
    router = moe.router
    axis = 0 if router.op == "Gemm" and router.attrs.get("transB", 0) else 1
    w = np.asarray(mgraph.values(router.inputs[1]))
    mgraph.set_input_constant(router, 1, np.concatenate([w] * m, axis=axis), name=namer(scope, "router_weight"))
    biases = [(router, 2)] if router.op == "Gemm" and len(router.inputs) > 2 and \
        isinstance(router.inputs[2], gs.Constant) and int(np.prod(router.inputs[2].shape)) == E else []
    reader = next(iter(router.outputs[0].outputs), None)
    if reader is not None and reader.op == "Add" and len(router.outputs[0].outputs) == 1:
        biases += [(reader, i) for i, t in enumerate(reader.inputs)
                   if isinstance(t, gs.Constant) and int(np.prod(t.shape)) == E]
    for node, i in biases:
        b = np.asarray(mgraph.values(node.inputs[i]))
        mgraph.set_input_constant(node, i, np.concatenate([b] * m, axis=-1), name=namer(scope, "router_bias"))
    mgraph.set_input_constant(moe.topk, 1, np.asarray([plan.top_k], np.int64), name=namer(scope, "k"))
    # the tensors between router and experts have m times as many experts or slots: shapes left to inference
    outputs = {t.name for t in graph.outputs}
    for node in [router, *moe.nodes]:
        for out in node.outputs:
            if out.name not in outputs:
                out.shape = None
    by_name = {n.name: n for n in moe.nodes}
    for name, i, values in plan.shapes:
        mgraph.set_input_constant(by_name[name], i, values, name=namer(scope, "shape"))
    log.info("moe: %s grown to %d experts, top-%d (noise %g); exact because %s", plan.name, plan.experts,
             plan.top_k, plan.noise, plan.reason)
