"""The grow morph: a whole transformer grown in one pass (hidden width, heads, FFN, blocks: HyperCloning, LLaMA Pro).

`grow` plans on the block and attention analysis (`onnxmorph.analysis.blocks`, `.attention`), not on
family code, and emits the registered single morphs that do the work: one `widen` of a residual
writer for the hidden width (the whole stream follows: tiling at an integer factor, average
expansion otherwise), one `widen` of each block's query projection for the heads (whole new heads;
grouped key/value heads follow their groups), one `widen` of each block's feed-forward input for
its units (a gated FFN's gate and up grow together) and one `block` per new identity block, spread
evenly as LLaMA Pro does. It applies them one after another in a single pass, so `run_passes`
verifies once, the receipt records `grow` with its parameters, and recipes can use it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph import limits
from onnxmorph.analysis import attention as mattention
from onnxmorph.analysis import blocks as mblocks
from onnxmorph.contract.passinfra import SEED, MorphPass, Param, PassResult
from onnxmorph.contract.registry import get_pass, register
from onnxmorph.errors import NotApplicable, UsageError
from onnxmorph.graph import core as mgraph
from onnxmorph.graph import layers
from onnxmorph.io import proto, streaming

log = logging.getLogger("onnxmorph")

# Sizes and counts a growth option may name (far above any model; the weights are bounded by limits).
_MAX_SIZE = 2**31
_SPEC = re.compile(r"(?:(?P<add>\+\d+)|(?P<size>\d+)|(?P<factor>\d+(?:\.\d+)?|\.\d+)\s*[xX])")


@dataclass(frozen=True)
class Growth:
    """A growth option read: a factor (`2x`, `1.5x`), a size (`1024`) or an increase (`+4`)."""

    text: str
    kind: str  # "factor", "size" or "add"
    value: Fraction

    def target(self, current: int, option: str, unit: str) -> int:
        """The new size of something that has `current`; NotApplicable when no whole size or a smaller one."""
        if self.kind == "factor":
            exact = self.value * current
            if exact.denominator != 1:
                raise NotApplicable(f"{option} {self.text}: {current} x {_decimal(self.value)} = {float(exact):g} "
                                    f"is not a whole number of {unit}")
            new = int(exact)
        else:
            new = int(self.value) + (current if self.kind == "add" else 0)
        if new < current:
            raise NotApplicable(f"{option} {self.text}: the model has {current} {unit} already; grow does not shrink")
        return new


def growth(value: Any) -> str:
    """Parse a growth option: `2x`, `1.5x` (factors), `1024` (a size) or `+4` (an increase); its normal text."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"expected a factor (2x, 1.5x), a size (1024) or an increase (+4), got {value!r}"
                         + (": write a factor as '1.5x'" if isinstance(value, float) else ""))
    return read_growth(value).text


def read_growth(value: int | str) -> Growth:
    text = str(value).strip()
    match = _SPEC.fullmatch(text) if len(text) <= 24 else None
    if match is None:
        hint = ": a factor is written with an x (1.5x)" if re.fullmatch(r"\d*\.\d+", text) else ""
        raise UsageError(f"expected a factor (2x, 1.5x), a size (1024) or an increase (+4), got {limits.quote(text)}"
                         + hint)
    if match["factor"]:
        try:
            factor = Fraction(Decimal(match["factor"]))
        except (InvalidOperation, ValueError):
            raise UsageError(f"expected a factor like 1.5x, got {limits.quote(text)}") from None
        if not 0 < factor <= _MAX_SIZE:
            raise UsageError(f"expected a positive factor, got {limits.quote(text)}")
        return Growth(f"{_decimal(factor)}x", "factor", factor)
    kind = "add" if match["add"] else "size"
    number = int(match[kind])
    if number > _MAX_SIZE or (kind == "size" and number == 0):
        raise UsageError(f"expected a size from 1 to {_MAX_SIZE}, got {limits.quote(text)}")
    return Growth(f"+{number}" if kind == "add" else str(number), kind, Fraction(number))


def _changes(step: MorphPass, other: MorphPass) -> str:
    """The parameters of `other` that differ from `step`'s, as "method netmorph"."""
    return ", ".join(f"{k} {v}" for k, v in other.config.items() if step.config.get(k) != v)


def _first_clause(text: str) -> str:
    """A refusal's reason without its advice: "X re-arranges ... (net2net cannot ...)" -> "X re-arranges ..."."""
    return text.split(" (", 1)[0]


def _decimal(value: Fraction) -> str:
    return f"{float(value):.12g}"


@dataclass
class GrowStep:
    """One single morph of the plan: the option it serves, the registered pass, and what it grows."""

    option: str
    step: MorphPass
    what: str
    given: tuple[str, ...] = ()  # the parameters grow chose (the seed is derived)
    fallback: MorphPass | None = None  # taken where `step` refuses (net2net's copies where no copy can be exact)
    optional: bool = False  # where it refuses, the step is left out (the layer keeps its size)
    reads: int | None = None  # an optional step runs only on a layer whose input is this wide by then

    def line(self) -> str:
        """The step as its command line would say it (with the parameters grow chose), and what it grows."""
        params = " ".join(f"{p.cli_flag} {self.step.config[p.name]}" for p in self.step.params if p.name in self.given)
        extra = f" ({_changes(self.step, self.fallback)} where it refuses)" if self.fallback is not None else ""
        return f"{self.step.name} {params}: {self.what}{extra}"

    def requires(self, analysis: mgraph.Analysis) -> Any:
        """The step's plan on `analysis`; where the step refuses and it has a fallback, the fallback's."""
        try:
            return self.step.requires(analysis)
        except NotApplicable as exc:
            if self.fallback is None:
                raise
            changed = _changes(self.step, self.fallback)
            log.info("grow: %s with %s refused (%s); %s instead", self.step.name,
                     _changes(self.fallback, self.step), exc, changed)
            self.step, self.fallback = self.fallback, None
            self.what += f" ({changed}: {_first_clause(str(exc))})"
            return self.step.requires(analysis)


@dataclass
class GrowPlan:
    steps: list[GrowStep]
    sizes: dict[str, list[int]]  # what grows: [before, after]
    first: Any = None  # the first step's own plan, made on the parent (its refusal comes before any work)
    new_layers: int = 0
    weight_bytes: int = 0  # the parent's float weights


@register
class GrowPass(MorphPass):
    """Grow a transformer in one pass: hidden width, attention heads, FFN units and blocks, the function kept.

    The plan is found on the graph (its residual blocks and attention modules, as `inspect` lists
    them), so it works on any exported model those are found in. --hidden widens the residual stream
    (every writer, norm, reader, the embeddings and the head): tiling at an integer factor (each
    channel copied, HyperCloning), average expansion at others (pre-norm blocks only). --heads adds
    whole heads to every attention (new query/key/value weights random, output rows zero;
    grouped-query key/value heads follow their groups). --ffn widens every block's feed-forward
    units (copies whose outgoing weights are shared; a gated FFN's gate and up together). --layers
    inserts identity blocks (copies of the block before them whose writers are zero, LLaMA Pro),
    spread evenly. Factors (2x, 1.5x) and sizes (1024, +4) are exact or refused naming what stops them.
    """

    name = "grow"
    summary = "grow a transformer: hidden width, heads, FFN units and identity blocks in one verified pass"
    params = (
        Param("hidden", growth, "the residual stream's width: a factor (2x, 1.5x) or a size (1024)", default=None,
              metavar="G"),
        Param("heads", growth, "attention heads per block: a factor (2x) or a count (16), at the same head size",
              default=None, metavar="G"),
        Param("ffn", growth, "every block's feed-forward units: a factor (2x, 1.5x) or a size (4096)", default=None,
              metavar="G"),
        Param("layers", growth, "blocks: +N inserts N identity blocks spread evenly, N asks for N in all, or a "
              "factor (2x)", default=None, metavar="N"),
        SEED,
    )

    @classmethod
    def probe(cls, model: mgraph.ModelOrAnalysis, layer: mgraph.LayerInfo) -> MorphPass | None:
        """`--ffn 2x` (what applies to every family with blocks, post-norm ones too), asked at the first layer of
        the first block only: `inspect` says once whether grow finds blocks to grow, and why not."""
        found = mblocks.model_blocks(model)
        first = next((n for n in found[0].nodes if mgraph.layer_info(n) is not None), None) if found else None
        return cls(ffn="2x") if first is not None and first.name == layer.name else None

    def _structure(self, model: mgraph.Analysis) -> GrowPlan:
        """The plan without the first step's check (which may allocate as much as the sizes asked for)."""
        return model.memo("grow", repr(self), lambda: _Planner(self, model).plan())

    def new_weights(self, model: mgraph.ModelOrAnalysis) -> tuple[int, int]:
        # Sized from the model's weights and the ratios asked for, before anything is allocated.
        plan = self._structure(mgraph.analysis(model))
        total = plan.weight_bytes
        ratio = {k: after / before for k, (before, after) in plan.sizes.items() if before}
        hidden = ratio.get("hidden", 1.0)
        inner = max(hidden, ratio.get("heads", 1.0), ratio.get("ffn", 1.0))
        grown = total * hidden * inner * ratio.get("blocks", 1.0)
        return int(max(0.0, grown - total)), plan.new_layers

    def requires(self, model: mgraph.ModelOrAnalysis) -> GrowPlan:
        analysis = mgraph.analysis(model)
        plan = self._structure(analysis)
        if plan.first is None:
            with _labelled(plan.steps[0], 1, len(plan.steps)):
                plan.first = plan.steps[0].requires(analysis)
        return plan

    def describe(self, plan: GrowPlan) -> dict[str, Any]:
        return {"sizes": {k: list(v) for k, v in plan.sizes.items()},
                "steps": [s.line() for s in plan.steps]}

    def call(self, model: mgraph.ModelOrAnalysis, plan: GrowPlan) -> PassResult:
        # A streaming parent (its weights left in their files, the child to be saved from them: the CLI) gets
        # its computed weights spilled too, as run_passes does for a parent kept in external data: the steps
        # rewrite the grown weights several times over, and each then hands on references, not the model.
        spill = streaming.streams(mgraph.model_of(model)) and not streaming.is_spilling()
        with streaming.spilling() if spill else contextlib.nullcontext():
            return PassResult(self._steps(model, plan), True)

    def _steps(self, model: mgraph.ModelOrAnalysis, plan: GrowPlan) -> onnx.ModelProto:
        child = mgraph.model_of(model)
        count = len(plan.steps)
        for k, item in enumerate(plan.steps, 1):
            analysis = mgraph.analysis(model) if k == 1 else mgraph.Analysis(child)
            log.info("grow: step %d of %d: %s", k, count, item.line())
            with _labelled(item, k, count):
                if k == 1:
                    planned = plan.first if plan.first is not None else item.requires(analysis)
                else:
                    new_bytes, new_layers = item.step.new_weights(analysis)
                    limits.NEW_BYTES.check(new_bytes, f"grow step {k} ({item.what})")
                    limits.NEW_LAYERS.check(new_layers, f"grow step {k} ({item.what})")
                    try:
                        if item.reads is not None and _in_width(mgraph.find_layer(analysis.view,
                                                                                  item.step.config["layer"])) \
                                != item.reads:
                            raise NotApplicable("its input is not the grown stream")
                        planned = item.requires(analysis)
                    except NotApplicable as exc:
                        if not item.optional:
                            raise
                        log.info("grow: step %d of %d left out: %s", k, count, exc)
                        continue
                result = item.step.call(analysis, planned)
            item.step.ensures(analysis, result)
            del analysis, planned
            child = result.model
            streaming.drop_superseded([child])  # weights a later step replaced again: their scratch files go
        return child


@contextlib.contextmanager
def _labelled(item: GrowStep, k: int, count: int) -> Iterator[None]:
    """A refusal inside says which option and step it came from."""
    try:
        yield
    except NotApplicable as exc:
        raise NotApplicable(f"{item.option}: step {k} of {count} ({item.what}): {exc}") from exc


class _Planner:
    """Reads the model's blocks and attention once and turns the options into single morphs."""

    def __init__(self, grow: GrowPass, analysis: mgraph.Analysis) -> None:
        self.grow, self.analysis, self.view = grow, analysis, analysis.view
        self.options = {name: read_growth(grow.config[name]) for name in ("hidden", "heads", "ffn", "layers")
                        if grow.config[name] is not None}
        if not self.options:
            raise UsageError("grow: nothing to grow: give --hidden, --heads, --ffn or --layers")
        self.blocks = mblocks.model_blocks(analysis)
        if not self.blocks:
            raise NotApplicable("grow: no transformer blocks found (no chain of residual Adds x + f(x) whose f holds "
                                "a MatMul/Gemm/Conv layer); `inspect` shows what the analysis finds")
        self.steps: list[GrowStep] = []
        self.sizes: dict[str, list[int]] = {}
        self.new_layers = 0

    def _seed(self) -> int:
        """Each step's own seed, from grow's seed and the step's number (new heads differ from block to block)."""
        return int(np.random.SeedSequence([self.grow.seed, len(self.steps)]).generate_state(1)[0] >> 1)

    def _add(self, option: str, name: str, what: str, fallback: dict[str, Any] | None = None, **params: Any) -> None:
        """A step of pass `name`; `fallback`: the parameters that replace some of `params` where the step refuses."""
        seed = self._seed()
        other = get_pass(name)(**{**params, **fallback}, seed=seed) if fallback else None
        self.steps.append(GrowStep(option, get_pass(name)(**params, seed=seed), what, tuple(params), other))

    def _label(self, block: mblocks.Block) -> str:
        return f"block {block.index}" + (f" ({block.module})" if block.module else "")

    def _width(self, node: gs.Node) -> int:
        return layers.out_channels(node, self.analysis.shapes)[1]

    def plan(self) -> GrowPlan:
        if "hidden" in self.options:
            self._hidden(self.options["hidden"])
        if "heads" in self.options:
            self._heads(self.options["heads"])
        if "ffn" in self.options:
            self._ffn(self.options["ffn"])
        if "layers" in self.options:
            self._layers(self.options["layers"])
        if not self.steps:
            asked = ", ".join(f"--{k} {g.text}" for k, g in self.options.items())
            raise UsageError(f"grow: nothing to grow: {asked} keeps every size as it is")
        order = ("hidden", "heads", "kv_heads", "ffn", "blocks")
        self.sizes = {k: self.sizes[k] for k in order if k in self.sizes}
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
        weights = sum(proto.declared_bytes(t) or 0 for t in self.analysis.model.graph.initializer
                      if t.data_type in floats)
        return GrowPlan(self.steps, self.sizes, new_layers=self.new_layers, weight_bytes=weights)

    # ------------------------------------------------------------------ hidden width

    def _hidden(self, spec: Growth) -> None:
        block = self.blocks[0]
        writer = _writer(block.sublayers[0])
        if writer is None:
            raise NotApplicable(f"--hidden: {self._label(block)}: no layer writes its first residual branch")
        old = self._width(writer)
        new = spec.target(old, "--hidden", "channels")
        self.sizes["hidden"] = [old, new]
        if new == old:
            return
        if new % old:
            post = next((b for b in self.blocks if b.kind == "post-norm"), None)
            if post is not None:
                raise NotApplicable(
                    f"--hidden {spec.text}: {old} -> {new} is not a multiple of {old}, and {self._label(post)} is "
                    f"post-norm (a {post.norms[-1]} after its residual Add): average expansion keeps the norms exact "
                    f"only in pre-norm blocks; an integer factor tiles exactly (2x: {2 * old})")
            q, extra = divmod(new, old)
            how = f"average expansion: {q} cop{'y' if q == 1 else 'ies'} of the stream and {extra} channels more"
        else:
            how = f"tiling: each channel {new // old} times"
        self._add("--hidden", "widen", f"hidden {old} -> {new}, {how}", layer=writer.name, width=new,
                  method="net2net")
        self._hidden_wide_heads(old, new)

    def _hidden_wide_heads(self, old: int, new: int) -> None:
        """Layers outside the blocks as wide as the stream (a masked-LM head's transform, a pooler) grow with it
        where they can, so that one hidden size describes the child (as a Hugging Face config needs). Each is an
        optional step: one that cannot grow exactly (its channels reach a graph output; a layer the stream's
        step widened already) keeps its width, and the log says why."""
        inside = {id(n) for b in self.blocks for n in b.nodes}
        for node in self.view.nodes:
            if id(node) in inside or node.op not in ("MatMul", "Gemm") or mgraph.layer_info(node) is None:
                continue
            try:
                if _in_width(node) != old or self._width(node) != old:  # reads the stream, as wide as it
                    continue
            except NotApplicable:  # a layer whose output rank is unknown is no stream-wide layer
                continue
            self._add("--hidden", "widen", f"{node.name} {old} -> {new} with the hidden size (outside the blocks, "
                      "where it can grow)", layer=node.name, width=new, method="net2net")
            self.steps[-1].optional, self.steps[-1].reads = True, new

    # ------------------------------------------------------------------ heads

    def _heads(self, spec: Growth) -> None:
        found = mattention.attention_modules(self.analysis, self.view, self.blocks)
        by_block = {a["block"]: a for a in found}
        before, after = [], []
        for block in self.blocks:
            attention = by_block.get(block.index)
            if attention is None:
                if any(s.attention for s in block.sublayers):
                    raise NotApplicable(f"--heads: {self._label(block)}: its attention's query, key and value "
                                        "projections are not found")
                continue
            where = f"--heads: {self._label(block)}"
            heads, head_dim, kv = attention["heads"], attention["head_dim"], attention["kv_heads"]
            if not heads or not head_dim:
                raise NotApplicable(f"{where}: its number of heads is unknown (no Reshape that splits the query "
                                    "into heads x head size)")
            if not kv or heads % kv:
                raise NotApplicable(f"{where}: its number of key/value heads is unknown ({kv}), so new query heads "
                                    "cannot be given theirs")
            group = heads // kv
            new = spec.target(heads, "--heads", "heads")
            before.append(heads)
            after.append(new)
            if new == heads:
                continue
            if new % group:
                fits = ", ".join(str(heads + group * k) for k in range(1, 4))
                raise NotApplicable(f"--heads {spec.text}: {new} query heads are not whole groups of {group} (each "
                                    f"of the {kv} key/value heads of {self._label(block)} serves {group}); "
                                    f"{fits} would be")
            new_kv = new // group
            self.sizes["kv_heads"] = [kv, new_kv]
            query = mgraph.find_layer(self.view, attention["query"])
            width = self._width(query)
            parts = (attention["query"], attention["key"], attention["value"])
            if parts[0] == parts[1] == parts[2]:
                expected, target = (heads + 2 * kv) * head_dim, (new + 2 * new_kv) * head_dim
                layout = f"({heads} + 2 x {kv}) heads"
            elif parts[0] in parts[1:]:
                raise NotApplicable(f"{where}: its query shares projection '{parts[0]}' with its key or value only; "
                                    "such a fusion is not grown")
            else:
                expected, target, layout = heads * head_dim, new * head_dim, f"{heads} heads"
            if width != expected:
                raise NotApplicable(f"{where}: query projection '{query.name}' has {width} outputs, not "
                                    f"{layout} x {head_dim} as its attention reads them")
            kv_text = f", key/value heads {kv} -> {new_kv}" if kv != heads else ""
            self._add("--heads", "widen", f"{self._label(block)} heads {heads} -> {new} of {head_dim}{kv_text} "
                      "(new heads, zero output rows)", layer=query.name, width=target, method="netmorph")
        if not before:
            raise NotApplicable("--heads: no attention found (`inspect` lists what the analysis finds)")
        self.sizes["heads"] = [max(before), max(after)]

    # ------------------------------------------------------------------ feed-forward units

    def _ffn(self, spec: Growth) -> None:
        attention = {a["block"]: a for a in mattention.attention_modules(self.analysis, self.view, self.blocks)}
        before, after = [], []
        for block in self.blocks:
            router = next((n for n in block.nodes if n.op == "TopK"), None)
            if router is not None:
                raise NotApplicable(f"--ffn: {self._label(block)} routes tokens to experts (TopK '{router.name}'): "
                                    "a mixture of experts is not grown by --ffn (`onnxmorph moe` adds experts)")
        for block in self.blocks:
            where = f"--ffn: {self._label(block)}"
            if block.index not in attention and any(s.attention for s in block.sublayers):
                raise NotApplicable(f"{where}: its attention's projections are not found, so its feed-forward "
                                    "layers cannot be told from them")
            projections = {attention[block.index][k] for k in ("query", "key", "value")} \
                if block.index in attention else set()
            groups = _ffn_inputs(block, projections)
            if not groups:
                raise NotApplicable(f"{where} has no feed-forward layer reading its stream")
            for group in groups:
                widths = {self._width(node) for node in group}
                names = ", ".join(f"'{n.name}'" for n in group)
                if len(widths) > 1:
                    raise NotApplicable(f"{where}: the feed-forward inputs {names} have different widths "
                                        f"({', '.join(map(str, sorted(widths)))})")
                old = widths.pop()
                new = spec.target(old, "--ffn", "units")
                before.append(old)
                after.append(new)
                if new == old:
                    continue
                follows = f", {', '.join(n.name for n in group[1:])} with it (gated)" if len(group) > 1 else ""
                # Copies of units (net2net, as HyperCloning) where they can be exact; new units whose output
                # weights start at zero (netmorph) where a copy would not sit where its original is read.
                self._add("--ffn", "widen", f"{self._label(block)} FFN {old} -> {new}{follows}",
                          layer=group[0].name, width=new, method="net2net", fallback={"method": "netmorph"})
        self.sizes["ffn"] = [max(before), max(after)]

    # ------------------------------------------------------------------ blocks

    def _layers(self, spec: Growth) -> None:
        count = len(self.blocks)
        total = spec.target(count, "--layers", "blocks")
        self.sizes["blocks"] = [count, total]
        added = total - count
        limits.NEW_LAYERS.check(added, f"--layers {spec.text}")
        block_pass = get_pass("block")
        after = [math.ceil((k + 1) * count / added) - 1 for k in range(added)]
        for index in sorted(set(after)):
            try:  # a refusal (a post-norm block) before any work, from the block morph itself
                block_pass(after=index).requires(self.analysis)
            except NotApplicable as exc:
                raise NotApplicable(f"--layers {spec.text}: {exc}") from exc
        # Last first, so that each index still names the parent's block.
        for index in sorted(after, reverse=True):
            block = self.blocks[index]
            self.new_layers += sum(1 for n in block.nodes if mgraph.layer_info(n) is not None)
            self._add("--layers", "block", f"a new block after {self._label(block)}: its copy with zero writers "
                      "(the identity)", after=index, init="copy")


def _in_width(node: gs.Node) -> int | None:
    """The input channels of a MatMul/Gemm layer, from its weight's declared dims."""
    w = node.inputs[1].shape
    if not w:
        return None
    if node.op == "Gemm":
        return int(w[1] if int(node.attrs.get("transB", 0)) else w[0])
    return int(w[-2]) if len(w) >= 2 else None


def _writer(sub: mblocks.Sublayer) -> gs.Node | None:
    """The layer nearest the residual Add on `sub`'s branch: widening it widens the whole stream."""
    members = {id(n) for n in sub.nodes}
    node = mgraph.producer(sub.branch)
    while node is not None and id(node) in members:
        if mgraph.layer_info(node) is not None:
            return node
        computed = [t for t in node.inputs if not isinstance(t, gs.Constant)]
        node = mgraph.producer(computed[0]) if computed else None
    return None


def _ffn_inputs(block: mblocks.Block, projections: set[str]) -> list[list[gs.Node]]:
    """The block's feed-forward input layers (those reading the stream that are not query/key/value
    projections), grouped where their outputs meet before the next layer (a gated FFN's gate and up)."""
    members = {id(n) for n in block.nodes}
    entries: list[gs.Node] = []
    for sub in block.sublayers:
        reached = {sub.stream.name}
        for node in sub.nodes:
            # values only: a Shape of the stream feeds reshape targets, not data
            if node.op in ("Shape", "Size") or not any(t.name in reached for t in node.inputs):
                continue
            if mgraph.layer_info(node) is None:
                reached.update(t.name for t in node.outputs)
            elif node.inputs[0].name in reached and node.name not in projections and \
                    all(node is not e for e in entries):
                entries.append(node)
    reach = {id(e): _reach(e, members) for e in entries}
    groups: list[list[gs.Node]] = []
    for entry in entries:
        joined = next((g for g in groups if any(reach[id(entry)] & reach[id(other)] for other in g)), None)
        if joined is None:
            groups.append([entry])
        else:
            joined.append(entry)
    return groups


def _reach(entry: gs.Node, members: set[int]) -> set[int]:
    """The nodes of the block that `entry`'s output reaches before passing another layer."""
    seen: set[int] = set()
    stack = [entry]
    while stack:
        for tensor in stack.pop().outputs:
            for reader in tensor.outputs:
                if id(reader) in members and id(reader) not in seen:
                    seen.add(id(reader))
                    if mgraph.layer_info(reader) is None:
                        stack.append(reader)
    return seen
