"""Channel coupling: every tensor, parameter and layer tied to one channel axis, for width-changing morphs.

Widening the channel axis of a tensor (a layer's output, a concatenated skip) touches much more
than its producer: batch-norm statistics, per-channel constants, depthwise convolutions (whose
group count grows), every operand of a residual sum (so every other producer of the stream),
Concat offsets, Flatten/Reshape blocks and the consumers' weights. `analyze` follows the axis in
both directions through the graph and returns a `Coupling` listing all of them, or raises
NotApplicable with one line naming the op in the way.

The traversal here is generic; what each op does with the channel axis is a *rule* registered for
its op types in `onnxmorph.analysis.channel_rules` (per-channel ops, norms, reductions, layers) and
`onnxmorph.analysis.channel_layout` (concat, reshapes, shuffles, slices, expands). A rule gets the analysis
and a `Visit` (the node, the slot that reached it, from which tensor, in which direction) and
either continues the slot onto the node's other tensors (`carry`, `through`), records what must
grow (`add_param`, `shape_fixes`, producers, consumers, group changes), or raises NotApplicable.

Vocabulary. A *space* is a set of `old` channels that grows by `inserts`: `(pos, count)` means
`count` new channels placed after old channel `pos - 1`. A *slot* says where a space sits in a
tensor: on `axis`, starting at `offset`, each channel owning `block` consecutive entries (a
Flatten gives each channel H*W columns; a depthwise conv with multiplier m gives it m). Some ops
re-arrange the channels (a grouped conv's new groups, a channel shuffle, a Split or a Concat
that spreads them over several tensors): what comes out is a *derived* space, named after the
node that made it.

    coupling = analyze(graph, "conv2_out", axis=1, inserts=[(32, 16)], shapes=tensor_shapes(model))
    coupling.producers      # layers writing the channels (new filters: incoming side)
    coupling.consumers      # layers reading them (new weight columns: outgoing side)
    coupling.params         # per-channel constants to extend (BN, PRelu slopes, Mul/Add)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import onnx_graphsurgeon as gs

# the rule modules register their rules in coupling.RULES when imported
from onnxmorph.analysis import channel_layout, channel_rules, channel_shapes, sizes  # noqa: F401
from onnxmorph.analysis.coupling import (  # noqa: F401  (the vocabulary, re-exported for the passes)
    CONTRIB,
    KEEPS_ZERO,
    LAYERS,
    RULES,
    Consumer,
    Coupling,
    GroupChange,
    Misfit,
    Param,
    Producer,
    ShapeFix,
    Shapes,
    Slot,
    Space,
    SplitFix,
    Visit,
    constant_ints,
    insert_positions,
    ints,
    map_reshape,
    prod,
    shape_of,
)
from onnxmorph.errors import NotApplicable

# ---------------------------------------------------------------------------- traversal


class Analysis:
    """The state of one traversal: the slots found so far, the queue, and what must grow."""

    def __init__(self, graph: gs.Graph, shapes: Shapes, *, allow_backward: bool,
                 ungroup: frozenset[str] = frozenset()) -> None:
        self.graph = graph
        self.ungroup = ungroup
        self.shapes = shapes
        self.allow_backward = allow_backward
        self.result = Coupling()
        self.seen: set[Slot] = set()
        self.by_tensor: dict[str, list[Slot]] = {}
        self.queue: deque[tuple[Slot, str]] = deque()
        self.done: set[tuple[str, Slot]] = set()
        self.outputs = {t.name for t in graph.outputs}
        self.inputs = {t.name for t in graph.inputs}
        self.tensors = graph.tensors()
        self.main_nodes = {id(node) for node in graph.nodes}
        self.memo: dict[object, object] = {}  # for rules that must act once per node
        self.rules = RULES
        self.sizes = sizes  # the size reasoning (onnxmorph.analysis.sizes) works on this Analysis
        # facts about sizes that depend on the graph and shapes only (onnxmorph.analysis.sizes): shared by every
        # analysis of one model when its shapes carry them
        facts_for = getattr(shapes, "facts_for", None)
        self.facts: dict[object, object] = facts_for(graph) if facts_for is not None else {}
        # run when every slot is known (a size read at run time must grow as much as what it shapes)
        self.checks: list[Callable[[], None]] = []
        self.fallback: tuple[tuple[int, int], ...] | None = None  # another placement of the new channels to try

    def space(self, k: int) -> Space:
        return self.result.spaces[k]

    def shape(self, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
        shape = shape_of(self.shapes, tensor)
        producer = tensor.inputs[0] if shape is None and tensor.inputs else None
        if producer is not None and producer.op in CONTRIB and producer.inputs:
            return self.shape(producer.inputs[0])  # ONNX shape inference skips them; their outputs are shaped alike
        if (shape is None or None in shape) and tensor.inputs:
            found = self.sizes.fallback_shape(self, tensor)  # what inference left unknown, from the sizes read
            if found is not None and (shape is None or len(shape) == len(found)):
                return tuple(d if d is not None else f for d, f in zip(shape or found, found))
        return shape

    def _placed(self, space: int) -> str | None:
        """Where a derived space's node put it: its first slot (met again at another tensor of that node, the same
        channels must be followed there: a Split's other part)."""
        return next((s.tensor for s in self.result.slots if s.space == space), None)

    def rank(self, tensor: gs.Tensor) -> int | None:
        return len(self.shape(tensor) or ()) or None

    def derive(self, node: gs.Node, old: int, inserts: Sequence[tuple[int, int]], kind: str) -> Space:
        """A new space made by `node` (its channels are the same new channels, re-arranged)."""
        space = Space(len(self.result.spaces), int(old), tuple((int(p), int(c)) for p, c in inserts),
                      derived_from=node.name, kind=kind)
        self.result.spaces.append(space)
        return space

    def add_slot(self, tensor: gs.Tensor, axis: int, offset: int, block: int, space: int, origin: str) -> None:
        if isinstance(tensor, gs.Constant):
            raise NotApplicable(f"constant '{tensor.name}' would need to carry the channels ({origin})")
        rank = self.rank(tensor)
        if rank is not None:
            axis %= rank
        slot = Slot(tensor.name, axis, offset, block, space)
        if slot in self.seen or self._same_layout(slot):
            return
        for other in self.by_tensor.get(slot.tensor, []):
            if other.axis != slot.axis:
                raise NotApplicable(f"tensor '{slot.tensor}' would widen on two axes ({origin})")
            size = self.space(other.space).old * other.block
            mine = self.space(space).old * block
            if offset < other.offset + size and other.offset < offset + mine:
                raise NotApplicable(f"tensor '{slot.tensor}' would widen twice over the same channels ({origin})")
        if tensor.name in self.outputs:
            raise NotApplicable(f"graph output '{tensor.name}' exposes the channels ({origin})")
        if tensor.name in self.inputs:
            raise NotApplicable(f"graph input '{tensor.name}' carries the channels ({origin})")
        self.seen.add(slot)
        self.by_tensor.setdefault(slot.tensor, []).append(slot)
        self.result.slots.append(slot)
        self.queue.append((slot, origin))

    def _same_layout(self, slot: Slot) -> bool:
        """Whether `tensor` already grows exactly so (another space with the same new entries: Q's and K's heads)."""
        mine = (slot.axis, slot.offset, self.space(slot.space).old * slot.block,
                insert_positions(self.space(slot.space), slot))
        return any(mine == (other.axis, other.offset, self.space(other.space).old * other.block,
                            insert_positions(self.space(other.space), other))
                   for other in self.by_tensor.get(slot.tensor, []))

    def carry(self, node: gs.Node, index: int, axis: int, offset: int, block: int, space: int,
              role: str = "shift") -> None:
        """Input `index` of `node` carries the slot: a computed tensor widens, a constant grows (`role`)."""
        tensor = node.inputs[index]
        if isinstance(tensor, gs.Constant):
            self.add_param(node, index, axis, offset, block, space, role)
        else:
            self.add_slot(tensor, axis, offset, block, space, f"{node.op} '{node.name}'")

    def blocker(self, node: gs.Node, space: int) -> None:
        self.result.zero_blockers.setdefault(space, [])
        if node.name not in self.result.zero_blockers[space]:
            self.result.zero_blockers[space].append(node.name)

    def uniform(self, node: gs.Node) -> None:
        if node.name not in self.result.uniform:
            self.result.uniform.append(node.name)

    def copy_blocker(self, node: gs.Node) -> None:
        if node.name not in self.result.copy_blockers:
            self.result.copy_blockers.append(node.name)

    def add_param(self, node: gs.Node, index: int, axis: int, offset: int, block: int, space: int, role: str) -> None:
        """Constant input `index` of `node` grows on `axis`; shared constants are resolved by `grow_params`."""
        rank = len(node.inputs[index].shape)
        param = Param(node.name, node.op, index, axis % rank if rank else axis, offset, block, space, role)
        if param not in self.result.params:
            self.result.params.append(param)

    def add_fix(self, fix: ShapeFix | SplitFix) -> None:
        target = self.result.split_fixes if isinstance(fix, SplitFix) else self.result.shape_fixes
        if isinstance(fix, SplitFix) and any(f.node == fix.node and f != fix for f in self.result.split_fixes):
            raise NotApplicable(f"Split '{fix.node}' would take new channels from two sides")
        if fix not in target:
            target.append(fix)

    def data_outputs(self, node: gs.Node) -> list[gs.Tensor]:
        return [t for t in node.outputs if t.outputs or t.name in self.outputs]

    def through(self, v: Visit, axis: int | None = None, offset: int | None = None, block: int | None = None) -> None:
        """The slot continues, unchanged unless told, on the node's first input and first output."""
        slot = v.slot
        extra = self.data_outputs(v.node)[1:]
        if extra:
            raise NotApplicable(f"{v.where}: its extra output '{extra[0].name}' is used (not supported)")
        for k, t in ((0, v.node.inputs[0]), (None, v.node.outputs[0])):
            if t is v.tensor:
                continue
            axis_t = slot.axis if axis is None else axis
            offset_t = slot.offset if offset is None else offset
            block_t = slot.block if block is None else block
            if k is None:
                self.add_slot(t, axis_t, offset_t, block_t, slot.space, v.where)
            else:
                self.carry(v.node, k, axis_t, offset_t, block_t, slot.space)

    def propose(self, inserts: Sequence[tuple[int, int]]) -> None:
        """Another placement of the widened layer's new channels, tried if this one is refused (a fused QKV's
        Split: spread over its parts rather than all in the last)."""
        if self.fallback is None and tuple(inserts) != self.space(0).inserts:
            self.fallback = tuple(inserts)

    def run(self) -> Coupling:
        try:
            return self._run()
        except Misfit:
            raise
        except NotApplicable as refusal:
            if self.fallback is None:
                raise
            raise Misfit(str(refusal), 0, self.fallback) from None

    def _run(self) -> Coupling:
        while self.queue:
            slot, _origin = self.queue.popleft()
            tensor = self.tensors[slot.tensor]
            if tensor.inputs and self.allow_backward:
                self.visit(Visit(tensor.inputs[0], slot, tensor, True))
            for node in list(tensor.outputs):
                if id(node) not in self.main_nodes:
                    # read by name inside an If/Loop/Scan body: the rules follow the main graph only
                    reader = node.name or node.outputs[0].name
                    raise NotApplicable(f"'{tensor.name}' is read inside a subgraph ({node.op} '{reader}' in a "
                                        "control-flow body): widening it there is not supported")
                self.visit(Visit(node, slot, tensor, False))
        for check in self.checks:
            check()
        self._merge_shape_fixes()
        return self.result

    def _merge_shape_fixes(self) -> None:
        """One fix per constant entry: a target reached from both sides (a reshape of heads met forward and back)
        is recorded twice, once with its growth and once as what its output grows by; they must agree."""
        kept: dict[tuple, tuple[ShapeFix, int]] = {}
        for fix in self.result.shape_fixes:
            key = (fix.node, fix.index, fix.position, fix.attr, fix.reader)
            growth = fix.delta if fix.delta is not None else self.result.added(fix.tensor, fix.axis)
            if key in kept and kept[key][1] != growth:
                raise NotApplicable(f"the entry {fix.position} of input {fix.index} of '{fix.node}' would grow by "
                                    f"{kept[key][1]} and by {growth}: cannot preserve the function")
            kept.setdefault(key, (fix, growth))
        self.result.shape_fixes = [fix for fix, _ in kept.values()]

    def visit(self, v: Visit) -> None:
        key = (v.node.name + ("<" if v.backward else ">") + v.tensor.name, v.slot)
        if key in self.done:
            return
        self.done.add(key)
        if self.space(v.slot.space).derived_from == v.node.name and v.tensor.name == self._placed(v.slot.space):
            return  # the node that re-arranged these channels, met where it put them: it has been followed already
        contrib = v.node.domain == "com.microsoft" and v.node.op in CONTRIB
        if v.node.domain not in ("", "ai.onnx", None) and not contrib:
            raise NotApplicable(f"{v.where} (domain {v.node.domain}) is in the way of the channels")
        fn = self.rules.get(v.node.op)
        if fn is None:
            raise NotApplicable(f"{v.where} is in the way of the channels of '{v.tensor.name}' (not supported)")
        if v.node.op not in KEEPS_ZERO:
            self.blocker(v.node, v.slot.space)
        if v.node.name not in self.result.touched:
            self.result.touched.append(v.node.name)
        fn(self, v)


def analyze(graph: gs.Graph, tensor: str, axis: int, inserts: Sequence[tuple[int, int]], shapes: Shapes, *,
            old: int | None = None, offset: int = 0, block: int = 1, backward: bool = True,
            ungroup: Sequence[str] = ()) -> Coupling:
    """Follow channel axis `axis` of `tensor` through `graph`; see the module docstring.

    `inserts` are the new channels, `(pos, count)` with `pos` in old channels; `old` is the number
    of channels (default: the tensor's size on `axis`). With `backward=False` the analysis does not
    go up into producers (for a new tensor spliced in, e.g. a concatenated skip). The grouped
    Convs named in `ungroup` are treated as dense producers (the pass rewrites them with
    block-diagonal weights and group 1), so new channels may go after all the old ones. Raises
    NotApplicable naming the op in the way when the function cannot be preserved (a `Misfit`
    when another placement of the new channels would do).
    """
    analysis = Analysis(graph, shapes, allow_backward=backward, ungroup=frozenset(ungroup))
    if tensor not in analysis.tensors:
        raise NotApplicable(f"no tensor '{tensor}' in the graph")
    t = analysis.tensors[tensor]
    if old is None:
        shape = analysis.shape(t)
        if shape is None or shape[axis] is None:
            raise NotApplicable(f"the channel count of '{tensor}' is unknown")
        old = int(shape[axis]) // block
    space = Space(0, int(old), tuple((int(p), int(c)) for p, c in inserts))
    if any(not 0 <= p <= old or c <= 0 for p, c in space.inserts):
        raise NotApplicable(f"insertions {list(space.inserts)} do not fit {old} channels")
    analysis.result.spaces.append(space)
    analysis.add_slot(t, axis, offset, block, 0, f"'{tensor}'")
    return analysis.run()


def analyze_placements(graph: gs.Graph, tensor: str, axis: int, inserts: Sequence[tuple[int, int]], shapes: Shapes,
                       **options: object) -> tuple[Coupling, tuple[tuple[int, int], ...]]:
    """`analyze`, retrying with the placement a `Misfit` asks for: (coupling, the inserts it used).

    For a pass that chooses where its new channels go (widen does; the concat skip does not).
    When no placement works, the first refusal is raised.
    """
    tried = [tuple(inserts)]
    first: Misfit | None = None
    while True:
        try:
            return analyze(graph, tensor, axis, tried[-1], shapes, **options), tried[-1]  # type: ignore[arg-type]
        except Misfit as misfit:
            first = first or misfit
            if misfit.space != 0 or misfit.inserts is None or misfit.inserts in tried or len(tried) > 3:
                raise first from None
            tried.append(misfit.inserts)
