"""The vocabulary of channel coupling: spaces, slots, what must grow, the rule table and rule helpers.

`onnxmorph.analysis.channels` runs the traversal; the rule modules (`channel_rules`,
`channel_layout`, `channel_shapes`) register what each op does with a channel axis here, with
`@rule`. See `channels` for the vocabulary's meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmorph.errors import NotApplicable

if TYPE_CHECKING:  # the traversal imports this module
    from onnxmorph.analysis.channels import Analysis

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
        return tuple(int(d) for d in tensor.shape)  # declared dims: a weight is not read for them
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
        inner_dst = prod(dst[a + 1:])
        # a unit axis (an unsqueezed one, or one head) takes the channels only when they fit it whole; else the
        # next axis, of the same tail size, is tried
        unit = dst[a] == 1 and a + 1 < len(dst)
        if unit and tuple(dst[:a]) != tuple(src[:axis]):
            continue  # (a unit batch before it is not the channel axis)
        if inner_dst is None or inner_dst == 0:
            return None
        if inner % inner_dst == 0 and not unit:
            k = inner // inner_dst
            return a, offset * k, block * k
        if inner_dst % inner == 0:
            k = inner_dst // inner
            if offset % k == 0 and block % k == 0:
                return a, offset // k, block // k
        if not unit:
            return None
    return None


def insert_positions(space: Space, slot: Slot) -> list[tuple[int, int]]:
    """The insertions of `slot`'s space in entries of its tensor: (index, count)."""
    return [(slot.offset + pos * slot.block, count * slot.block) for pos, count in space.inserts]
