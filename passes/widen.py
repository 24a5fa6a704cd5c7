"""The width morph: more output channels (units) for a Conv, Gemm or MatMul, with every coupled tensor following."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph.analysis import averaging, channel_edits, channels, sizes
from onnxmorph.contract.passinfra import SEED, MorphPass, Param, PassResult, layer_name, layer_weight, positive_int
from onnxmorph.contract.registry import register
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph
from onnxmorph.graph import layers
from onnxmorph.graph.core import LayerInfo
from onnxmorph.numerics import widening as wsolve
from onnxmorph.numerics.dtypes import is_float


def non_negative_float(value: Any) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError("expected a non-negative number")
    return number


@dataclass
class _Plan:
    coupling: channels.Coupling
    modes: dict[int, str]  # space id -> "random" (zero-outgoing) or "copy"
    sources: dict[int, np.ndarray]
    guards: dict[int, int]  # space id -> its first new channels kept exactly 0 for an LRN (zero-incoming)
    average: averaging.Average | None = None  # average expansion of a normalised stream

    def sources_of(self, space: int) -> np.ndarray | None:
        return self.sources.get(space) if self.modes[space] == "copy" else None


@register
class WidenPass(MorphPass):
    """Raise the output channels of a Conv/Gemm/MatMul layer to `width`, keeping the function exactly.

    Every tensor, parameter and layer coupled to the widened channels (see onnxmorph.analysis.channels)
    follows: per-channel constants grow, depthwise convs get new groups, residual sums widen all
    their producers, consumers get new weight entries. Methods: `netmorph` (new filters random,
    consumers' new weights zero; before an LRN the new channels go after the old ones and the few
    its windows reach are exactly 0 (zero filters, random outgoing weights), a grouped producer
    becoming dense if need be), `net2net` (copies of
    random channels, outgoing weights shared; `noise` adds a compensated perturbation) and
    `lemon` (copies, random outgoing weights corrected so each channel's copies sum to the original).
    """

    name = "widen"
    summary = "more output channels for a Conv/Gemm/MatMul (coupled layers follow)"
    params = (
        Param("layer", layer_name, "the Conv, Gemm or MatMul layer: node name, output name or module "
              "path, as inspect prints them", metavar="L"),
        Param("width", positive_int, "the new number of output channels (units)", metavar="N"),
        Param("method", str, "how the new channels are filled", default="netmorph", choices=wsolve.METHODS),
        SEED,
        Param("noise", non_negative_float, "net2net only: compensated noise on the copies' outgoing weights, "
              "relative to their scale", default=0.0, metavar="X"),
    )

    @classmethod
    def probe(cls, model: onnx.ModelProto, layer: LayerInfo) -> MorphPass | None:
        view = mgraph.read_view(model)
        try:
            node = mgraph.find_layer(view, layer.name)
            _, old, groups = layers.out_channels(node, mgraph.tensor_shapes(model))
        except NotApplicable:
            return cls(layer=layer.name, width=max(layer.weight_shape[0], 1) * 2)
        width = math.ceil(old * 1.5 / groups) * groups
        return cls(layer=layer.name, width=max(width, old + groups))

    def new_weights(self, model: onnx.ModelProto) -> tuple[int, int]:
        # The layer's new filters and as many new inputs of its consumers: about twice a filter each.
        found = layer_weight(model, self.layer)
        if found is None or len(found[0]) < 2:
            return 0, 0
        shape, itemsize = found
        return 2 * self.width * math.prod(shape) // max(1, min(shape[:2])) * itemsize, 0

    def _plan(self, model: mgraph.Analysis) -> _Plan:
        view = mgraph.read_view(model)
        node = mgraph.find_layer(view, self.layer)
        shapes = sizes.analysis_shapes(model)
        axis, old, groups = layers.out_channels(node, shapes)
        where = f"layer '{self.layer}'"
        if self.width <= old:
            raise NotApplicable(f"{where} has {old} output channels already; --width must be larger")
        if self.noise and self.method != "net2net":
            raise NotApplicable(f"{where}: --noise applies to --method net2net only")
        coupling, inserts = self._couple(view, node, shapes, axis, old, groups)
        if self.method != "netmorph" and coupling.for_copies and any(s.kind == "groups" for s in coupling.spaces):
            inserts = coupling.for_copies  # copies need each group of a grouped reader to grow by its own channels
            coupling = channels.analyze(view, node.outputs[0].name, axis, inserts, shapes, old=old)
        _check_types(view, coupling)
        average = self._check_tiling(view, coupling, old) if coupling.uniform else None
        modes: dict[int, str] = {}
        sources: dict[int, np.ndarray] = {}
        if self.method != "netmorph":
            self._check_copies(coupling)
            modes[0] = "copy"
            rng = np.random.default_rng([self.seed, 1])
            # a spread placement puts new channels at the end of each group: each copies one of its group
            groups = producer_groups(coupling) if producer_groups(coupling) > 1 else len(inserts)
            sources[0] = wsolve.replication_sources(old, inserts, rng, groups)
            if average is not None:
                sources[0] = wsolve.average_sources(old, self.width - old, rng, -2 if average.zero else -1)
            self._check_grouped_copies(view, coupling, sources[0])
        else:
            for space in coupling.spaces:
                blockers = coupling.zero_blockers.get(space.id, [])
                if coupling.lrn_guard.get(space.id) and blockers:
                    bad = mgraph.find_node(view, blockers[0])
                    raise NotApplicable(
                        f"LRN '{coupling.lrn[0]}' needs the first new channels exactly 0, but {bad.op} '{bad.name}' "
                        "does not map 0 to 0"
                    )
                modes[space.id] = "random"
        guards = {k: min(v, coupling.spaces[k].added) for k, v in coupling.lrn_guard.items()}
        return _Plan(coupling, modes, sources, guards, average)

    def _couple(self, view: gs.Graph, node: gs.Node, shapes: channels.Shapes, axis: int, old: int,
                groups: int) -> tuple[channels.Coupling, Any]:
        """The coupling of the widened channels and where the new ones go (the insertions)."""
        added = self.width - old
        tensor = node.outputs[0].name
        if not (node.op == "Conv" and groups > 1 and node.inputs[1].shape[1] != 1):
            # where the new channels go is ours to choose: a grouped reader or a channel shuffle may ask
            # for them spread over its groups
            return channels.analyze_placements(view, tensor, axis, [(old, added)], shapes, old=old)
        # new channels go at the end of every group; when what follows needs them after all the
        # old channels (an LRN), the conv becomes dense instead (its compute grows `groups` times)
        per = old // groups
        try:
            if added % groups:
                raise NotApplicable(
                    f"layer '{self.layer}' has {groups} groups: --width must grow it by a multiple of {groups}")
            inserts = [((g + 1) * per, added // groups) for g in range(groups)]
            return channels.analyze(view, tensor, axis, inserts, shapes, old=old), inserts
        except NotApplicable as grouped:
            inserts = [(old, added)]
            try:
                return channels.analyze(view, tensor, axis, inserts, shapes, old=old, ungroup=[node.name]), inserts
            except NotApplicable:
                raise grouped from None

    def _check_tiling(self, view: gs.Graph, coupling: channels.Coupling, old: int) -> averaging.Average | None:
        """A norm (or mean) over the widened channels is exact when every channel is copied equally (tiling,
        None), or, at other widths, by average expansion (see onnxmorph.analysis.averaging)."""
        norm = mgraph.find_node(view, coupling.uniform[0])
        what = "reduces over the channel axis" if norm.op.startswith("Reduce") else "normalises over the widened axis"
        tiled = f"{norm.op} '{norm.name}' {what}: exact only when the channels are tiled"
        if self.method == "netmorph":
            raise NotApplicable(f"{tiled} or averaged (--method net2net or lemon; tiling at a multiple of {old})")
        if not (self.width - old) % old:
            return None
        return averaging.plan_average(view, coupling, old, self.width, tiled)

    def _check_copies(self, coupling: channels.Coupling) -> None:
        """net2net and lemon copy channels: refused where a copy could not stand beside its original."""
        if coupling.lrn:
            raise NotApplicable(
                f"LRN '{coupling.lrn[0]}' sums neighbouring channels: copies change its sums "
                f"({self.method} cannot be exact; use --method netmorph)"
            )
        derived = [s for s in coupling.spaces if s.derived_from]
        if derived and derived[0].kind == "groups":
            raise NotApplicable(
                f"Conv '{derived[0].derived_from}' would get new groups that copy nothing "
                f"({self.method} cannot be exact; use --method netmorph)"
            )
        if coupling.copy_blockers or derived:
            where = (coupling.copy_blockers or [s.derived_from for s in derived])[0]
            raise NotApplicable(
                f"'{where}' re-arranges the widened channels, so a copy would not sit where its original "
                f"is read ({self.method} cannot be exact; use --method netmorph)"
            )

    def _check_grouped_copies(self, view: gs.Graph, coupling: channels.Coupling, sources: np.ndarray) -> None:
        for consumer in coupling.consumers:
            node = mgraph.find_node(view, consumer.node)
            groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
            if groups == 1:
                continue
            per_in = node.inputs[1].shape[1]
            start = 0
            space = coupling.spaces[consumer.slot.space]
            for g, (_pos, count) in enumerate(space.inserts):
                for src in sources[start:start + count]:
                    if src < 0:
                        continue
                    first = consumer.offset + int(src) * consumer.block
                    if first // per_in != g:
                        raise NotApplicable(
                            f"Conv '{node.name}' (group {groups}): a copied channel would land in another group"
                        )
                start += count

    def requires(self, model: mgraph.ModelOrAnalysis) -> _Plan:
        return self._plan(mgraph.analysis(model))

    def describe(self, plan: _Plan) -> dict[str, Any]:
        c = plan.coupling
        others = [p.node for p in c.producers if p.node != self.layer]
        return {
            "width": self.width,
            "coupled": others,
            "consumers": [x.node for x in c.consumers],
            "made_dense": [p.node for p in c.producers if p.ungroup],
        }

    # ------------------------------------------------------------------ rewrite

    def call(self, model: mgraph.ModelOrAnalysis, plan: _Plan) -> PassResult:
        model = mgraph.model_of(model)
        c = plan.coupling
        graph = mgraph.import_graph(model)
        nodes = {n.name: n for n in graph.nodes}
        rng = np.random.default_rng([self.seed, 2])
        for p in c.producers:
            _grow_producer(nodes[p.node], p, plan, rng)

        def extend(param: channels.Param, array: np.ndarray) -> np.ndarray:
            grown = channel_edits.extend_param(param, array, c, rng, sources=plan.sources_of(param.space))
            average = plan.average
            if average is not None and (param.role == "norm-scale" or (param.node, param.index) in average.weights):
                grown = grown * np.sqrt(average.scale)  # the stream's variance shrank by s, so did the norm's
            return grown

        channel_edits.grow_coupling(graph, c, extend, lambda node, w, q: self._outgoing(node, w, q, c, plan, rng),
                                    rng, plan.guards)
        if plan.average is not None:
            _rescale_epsilons(graph, nodes, plan.average)
        return PassResult(mgraph.export_model(graph, like=model), True)

    def _outgoing(self, node: gs.Node, w: np.ndarray, consumer: channels.Consumer, c: channels.Coupling,
                  plan: _Plan, rng: np.random.Generator) -> np.ndarray:
        space = c.spaces[consumer.slot.space]
        mode = plan.modes[space.id]
        method = "netmorph" if mode != "copy" else self.method
        src = plan.sources.get(space.id)
        groups = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
        if groups == 1:
            return wsolve.solve_widen_outgoing(
                w, consumer.weight_axis, space.inserts, rng, method=method, sources=src, offset=consumer.offset,
                block=consumer.block, noise=self.noise, random_first=plan.guards.get(space.id, 0))
        # a grouped consumer whose every group grows by the same channels: solve group by group
        per_in = w.shape[1]
        per_out = w.shape[0] // groups
        parts = []
        start = 0
        for g, (pos, count) in enumerate(space.inserts):
            at = consumer.offset + pos * consumer.block
            rel = at - g * per_in
            local_src = None
            if src is not None:
                local_src = (consumer.offset + src[start:start + count] * consumer.block - g * per_in)
            part = w[g * per_out:(g + 1) * per_out]
            # the local channels of this group: block 1 entries, insertion at `rel`
            parts.append(wsolve.solve_widen_outgoing(
                part, 1, [(rel, count * consumer.block)], rng, method=method,
                sources=None if local_src is None else _expand_block(local_src, consumer.block),
                noise=self.noise, random_first=plan.guards.get(space.id, 0) if g == 0 else 0))
            start += count
        return np.concatenate(parts, axis=0)


def _check_types(view: gs.Graph, coupling: channels.Coupling) -> None:
    for name in coupling.layers + [p.node for p in coupling.params]:
        n = mgraph.find_node(view, name)
        for t in n.inputs[1:]:
            if isinstance(t, gs.Constant) and t.values.dtype.kind not in "iu" and not is_float(t.values.dtype):
                raise NotApplicable(f"{n.op} '{n.name}': constant '{t.name}' has type {t.values.dtype}")
        if n.op in channels.LAYERS and not is_float(n.inputs[1].values.dtype):
            raise NotApplicable(f"{n.op} '{n.name}': its weight type {n.inputs[1].values.dtype} is not a float type")


def _grow_producer(node: gs.Node, p: channels.Producer, plan: _Plan, rng: np.random.Generator) -> None:
    """New filters (and bias entries) for a layer writing the channels."""
    space = plan.coupling.spaces[p.slot.space]
    w = mgraph.values(node.inputs[1])
    if p.ungroup:
        w = wsolve.ungroup_weight(w, p.ungroup)
        node.attrs["group"] = 1
    guard = plan.guards.get(space.id, 0)
    block = p.slot.block  # > 1: each channel is a block of outputs (an attention head of a projection)
    mgraph.set_input_constant(node, 1, wsolve.solve_widen_incoming(
        w, p.weight_axis, space.inserts, rng, mode=plan.modes[space.id], sources=plan.sources_of(space.id),
        zero_first=guard, block=block, old=space.old))
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        b = mgraph.values(node.inputs[2])
        if b.ndim >= 1 and b.shape[-1] == space.old * block and b.size >= space.old * block:
            mgraph.set_input_constant(node, 2, wsolve.fill_channels(
                b, -1, space.inserts, 0.0, sources=plan.sources_of(space.id), block=block, old=space.old))
        elif guard and np.any(b != 0):
            raise NotApplicable(f"{node.op} '{node.name}': its broadcast bias is not zero")


def _rescale_epsilons(graph: gs.Graph, nodes: dict[str, gs.Node], average: averaging.Average) -> None:
    """Average expansion: every norm's epsilon scales with the stream's variance (by s)."""
    for name in average.epsilon_attrs:
        node = nodes[name]
        node.attrs["epsilon"] = float(node.attrs.get("epsilon", 1e-5)) * average.scale
    for name, index in average.epsilon_inputs:
        node = nodes[name]
        channel_edits.private_constant(graph, node, index, mgraph.values(node.inputs[index]) * average.scale)


def producer_groups(coupling: channels.Coupling) -> int:
    return max([p.groups for p in coupling.producers] or [1])


def _expand_block(first: np.ndarray, block: int) -> np.ndarray:
    return (np.asarray(first).reshape(-1, 1) + np.arange(block)).reshape(-1)
