"""Channel coupling: every tensor, parameter and layer tied to one channel axis, for width-changing morphs.

Widening the channel axis of a tensor (a layer's output, a concatenated skip) touches much more
than its producer: batch-norm statistics, per-channel constants, depthwise convolutions (whose
group count grows), every operand of a residual sum (so every other producer of the stream),
Concat offsets, Flatten/Reshape blocks and the consumers' weights. `analyze` follows the axis in
both directions through the graph and returns a `Coupling` listing all of them, or raises
NotApplicable with one line naming the op in the way.

The traversal here is generic; what each op does with the channel axis is a *rule* registered for
its op types in `onnxmorph.channel_rules` (per-channel ops, norms, reductions, layers) and
`onnxmorph.channel_layout` (concat, reshapes, shuffles, slices, expands). A rule gets the analysis
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

import importlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.errors import NotApplicable

Shapes = dict[str, "tuple[int | None, ...] | None"]
LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class Space:
    """A set of `old` channels growing by `inserts`; `derived_from` names the node that made it."""

    id: int
    old: int
    inserts: tuple[tuple[int, int], ...]
    derived_from: str | None = None
    kind: str = ""  # of a derived space: "groups" (a grouped conv's new groups), "shuffle", "part"

    @property
    def added(self) -> int:
        return sum(c for _, c in self.inserts)


@dataclass(frozen=True)
class Slot:
    """Where a space sits in a tensor: its axis, the first entry, entries per channel."""

    tensor: str
    axis: int
    offset: int
    block: int
    space: int


@dataclass(frozen=True)
class Producer:
    """A layer whose output channels are the space: gets new filters on `weight_axis` (and bias)."""

    node: str
    op: str
    slot: Slot
    weight_axis: int
    groups: int = 1
    ungroup: int = 0  # > 1: a grouped Conv (this many groups) that becomes dense so new channels go last


@dataclass(frozen=True)
class Consumer:
    """A layer reading the space: gets new weight entries on `weight_axis` (`offset`/`block` there)."""

    node: str
    op: str
    slot: Slot
    weight_axis: int
    offset: int
    block: int


@dataclass(frozen=True)
class Param:
    """A per-channel constant (input `index` of `node`) extended on `axis` with the space's channels."""

    node: str
    op: str
    index: int
    axis: int
    offset: int
    block: int
    space: int
    role: str  # what the new entries are filled with: "scale", "shift", "var", "copy-only", "filter", "bias"


@dataclass(frozen=True)
class GroupChange:
    """A Conv whose group count grows: depthwise (`derived` None) or grouped with new groups."""

    node: str
    added_groups: int
    derived: int | None = None
    new_filters: tuple[tuple[int, int], ...] = ()  # (output index, count) of the new groups' filters


@dataclass(frozen=True)
class ShapeFix:
    """A constant that spells a size: entry `position` of input `index` (or of attribute `attr`) grows.

    By `delta` entries, or, when None, by what `tensor`'s `axis` gains (a Reshape target, Resize sizes).
    """

    node: str
    index: int
    position: int
    tensor: str
    axis: int
    delta: int | None = None
    attr: str | None = None
    reader: str | None = None  # `node` is a Concat building this node's target: the reader gets its own copy


@dataclass(frozen=True)
class SplitFix:
    """A Split on the channel axis whose output sizes become `sizes` (written explicitly)."""

    node: str
    sizes: tuple[int, ...]


class Misfit(NotApplicable):
    """A refusal that a different placement of the new channels would avoid.

    `inserts` is that placement for space `space` (e.g. spread evenly over the groups of a grouped
    conv or of a channel shuffle); a pass that chooses where the new channels go may retry with it.
    """

    def __init__(self, message: str, space: int, inserts: Sequence[tuple[int, int]] | None) -> None:
        super().__init__(message)
        self.space = space
        self.inserts = tuple(inserts) if inserts else None


@dataclass
class Coupling:
    """Everything tied to a widened channel axis; see the module docstring."""

    spaces: list[Space] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    groups: list[GroupChange] = field(default_factory=list)
    shape_fixes: list[ShapeFix] = field(default_factory=list)
    split_fixes: list[SplitFix] = field(default_factory=list)
    lrn: list[str] = field(default_factory=list)
    # per space id: how many of its first new channels must be exactly 0 (inside an old channel's LRN window)
    lrn_guard: dict[int, int] = field(default_factory=dict)
    # per space id: the ops between producers and consumers that do not map 0 to 0
    zero_blockers: dict[int, list[str]] = field(default_factory=dict)
    # ops that separate a new channel from the old one it would copy (net2net/lemon cannot be exact)
    copy_blockers: list[str] = field(default_factory=list)
    # ops exact only when every channel is copied equally (norms and means over the widened axis: tiling)
    uniform: list[str] = field(default_factory=list)
    # every node a slot reached, in order (what average expansion must check is linear)
    touched: list[str] = field(default_factory=list)
    # tensors whose shape changes although no slot names them (inside a channel shuffle)
    stale: list[str] = field(default_factory=list)
    # a placement of the new channels that copies can use where this one gives a grouped conv new groups
    # (every group then grows by copies of its own channels)
    for_copies: tuple[tuple[int, int], ...] | None = None

    def added(self, tensor: str, axis: int) -> int:
        """How many entries `tensor`'s `axis` gains."""
        return sum(self.spaces[s.space].added * s.block for s in self.slots if s.tensor == tensor and s.axis == axis)

    def params_by_input(self) -> dict[tuple[str, int], list[Param]]:
        """The per-channel constants grouped by (node, input index), last offset first.

        One constant can hold several slots (e.g. after a Concat); extending the last one first
        keeps the earlier offsets valid.
        """
        grouped: dict[tuple[str, int], list[Param]] = {}
        for param in self.params:
            grouped.setdefault((param.node, param.index), []).append(param)
        return {k: sorted(v, key=lambda q: q.offset, reverse=True) for k, v in grouped.items()}

    @property
    def tensors(self) -> list[str]:
        return sorted({s.tensor for s in self.slots})

    @property
    def layers(self) -> list[str]:
        """Names of the layers that change: producers first, then consumers and group changes."""
        names: list[str] = []
        for name in [p.node for p in self.producers] + [c.node for c in self.consumers] + [g.node for g in self.groups]:
            if name not in names:
                names.append(name)
        return names


# ---------------------------------------------------------------------------- the rule table


@dataclass(frozen=True)
class Visit:
    """One step of the traversal: `slot` (on `tensor`) reached `node`, from its output when `backward`."""

    node: gs.Node
    slot: Slot
    tensor: gs.Tensor
    backward: bool

    @property
    def where(self) -> str:
        return f"{self.node.op} '{self.node.name}'"


Rule = Callable[["Analysis", Visit], None]
RULES: dict[str, Rule] = {}
# Ops that map a zero channel to zero given the new parameters onnxmorph gives it (0 bias/shift,
# unit scale, BN mean 0 var 1): a channel that is 0 at the producer stays 0 through them (LRN guard).
KEEPS_ZERO: set[str] = set()


# ops of onnxruntime's com.microsoft domain that have a rule (fused norms written by its optimiser)
CONTRIB: set[str] = set()


# the modules whose rules register themselves here when imported (they import this module)
RULE_MODULES = ("onnxmorph.channel_rules", "onnxmorph.channel_layout", "onnxmorph.channel_shapes")


def load_rules() -> dict[str, Rule]:
    """The rule table, filled on first use (an import of the rule modules at the top would be a loop)."""
    if not RULES:
        for name in RULE_MODULES:
            importlib.import_module(name)
    return RULES


def rule(*ops: str, keeps_zero: bool = True, domain: str = "") -> Callable[[Rule], Rule]:
    """Register `fn` as the channel rule of `ops` (see the module docstring)."""
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
            if keeps_zero:
                KEEPS_ZERO.add(op)
            if domain == "com.microsoft":
                CONTRIB.add(op)
        return fn
    return register


# ---------------------------------------------------------------------------- helpers for rules


def shape_of(shapes: Shapes, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.values.shape)
    shape = shapes.get(tensor.name)
    if shape is None and tensor.shape is not None:
        shape = tuple(d if isinstance(d, int) else None for d in tensor.shape)
    return shape


def ints(value: object) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


def prod(dims: Sequence[int | None]) -> int | None:
    out = 1
    for d in dims:
        if d is None:
            return None
        out *= int(d)
    return out


def constant_ints(node: gs.Node, index: int, attr: str | None = None) -> list[int] | None:
    """Integers given by attribute `attr` or by constant input `index`; None when absent or computed."""
    if attr is not None and attr in node.attrs:
        return ints(node.attrs[attr])
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        return ints(node.inputs[index].values)
    return None


def map_reshape(src: Sequence[int | None], dst: Sequence[int | None], axis: int, offset: int,
                block: int) -> tuple[int, int, int] | None:
    """Where a channel slot on `src`'s `axis` lands after reshaping to `dst`: (axis, offset, block).

    None when the channels do not stay whole blocks of one axis (a channel shuffle splits them).
    """
    before, rest = prod(src[:axis]), prod(src[axis:])
    inner = prod(src[axis + 1:])
    if rest is None or inner is None:
        return None
    for a in range(len(dst)):
        # A reshape keeps the element count, so a tail of `rest` entries leaves a head of `before`:
        # unknown leading sizes ([B*T, C] -> [B, T, C] with T dynamic) need not be known to match.
        head = prod(dst[:a])
        if prod(dst[a:]) != rest or (before is not None and head is not None and head != before):
            continue
        if dst[a] == 1 and a + 1 < len(dst):
            continue
        inner_dst = prod(dst[a + 1:])
        if inner_dst is None or inner_dst == 0:
            return None
        if inner % inner_dst == 0:
            k = inner // inner_dst
            return a, offset * k, block * k
        if inner_dst % inner == 0:
            k = inner_dst // inner
            if offset % k == 0 and block % k == 0:
                return a, offset // k, block // k
        return None
    return None


def insert_positions(space: Space, slot: Slot) -> list[tuple[int, int]]:
    """The insertions of `slot`'s space in entries of its tensor: (index, count)."""
    return [(slot.offset + pos * slot.block, count * slot.block) for pos, count in space.inserts]


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
        self.rules = load_rules()
        # the size reasoning works on this module's Analysis, so it is imported when one is made
        self.sizes = importlib.import_module("onnxmorph.sizes")
        # facts about sizes that depend on the graph and shapes only (onnxmorph.sizes): shared by every
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
        rank = len(node.inputs[index].values.shape)
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
        return self.result

    def visit(self, v: Visit) -> None:
        key = (v.node.name + ("<" if v.backward else ">") + v.tensor.name, v.slot)
        if key in self.done:
            return
        self.done.add(key)
        if self.space(v.slot.space).derived_from == v.node.name:
            return  # the node that re-arranged these channels: it has been followed already
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
