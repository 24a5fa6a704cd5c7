"""export-hf: a child grown by widen and block written back as a Hugging Face checkpoint of its parent's family.

    from onnxmorph.hf import export_hf
    result = export_hf("child.onnx", like="parent_hf/", out="child_hf/")   # parent.onnx found in parent_hf/
    AutoModelForCausalLM.from_pretrained("child_hf/")

The steps: the child's receipt must list only widen and block; the parent export (found by the
digest in the receipt) is matched to the parent checkpoint by value (onnxmorph.hf.matching); each
parameter's grown weight is read from the child (blocks that `block` inserted become new layers,
the layers after them renumbered); the new sizes are solved from the weights' shapes
(onnxmorph.hf.families: one hidden, FFN, query and key/value width for the whole model, or the
child is refused naming the weight that differs); config.json keeps every other field of the
parent's. What the config derives from the sizes is kept true: the norms' epsilon (average
expansion scales it), Gemma's embedding scale sqrt(hidden), head_dim (written where the family reads
it; where it derives it as hidden / heads, or its config validator wants hidden a multiple of the
heads, heads that write zero are added until it holds), and tied embeddings (untied, with a head of
its own, when growth made the head differ from the embedding). With transformers installed, the
written folder is loaded and compared with the ONNX child before it replaces anything
(onnxmorph.hf.check).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmorph.analysis import attention as mattention
from onnxmorph.analysis import averaging
from onnxmorph.analysis import blocks as mblocks
from onnxmorph.analysis.blocks import FUSED_NORMS
from onnxmorph.errors import NotApplicable, OnnxMorphError, UsageError
from onnxmorph.graph import core as mgraph
from onnxmorph.hf import check as hfcheck
from onnxmorph.hf import checkpoint as ckpt
from onnxmorph.hf import families as fam
from onnxmorph.hf import matching
from onnxmorph.hf.families import GROWN, Family, Sizes
from onnxmorph.io import loading as mio
from onnxmorph.pipeline import receipt

log = logging.getLogger("onnxmorph")

ModelLike = Union[onnx.ModelProto, str, os.PathLike]
# The morphs whose children are still the same architecture, at other sizes (grow runs widen and block).
WRITABLE = ("widen", "block", "grow")
_WHY_NOT = {
    "deepen": "adds a layer inside a block",
    "subnet": "adds a sub-network beside a layer",
    "kernel": "changes a convolution's kernel",
    "skip": "adds a connection between layers",
}
_SIZE_NAMES = {"D": "hidden width", "I": "FFN width", "Q": "query width (heads x head_dim)",
               "KV": "key/value width (key/value heads x head_dim)"}


@dataclass
class ExportResult:
    """What export_hf wrote: the folder, the family, the parent's and the child's sizes, and what it had to adapt."""

    out: Path
    family: str
    parent_sizes: Sizes
    sizes: Sizes
    config: dict[str, Any]
    parameters: int
    notes: list[str] = field(default_factory=list)
    check: dict[str, Any] | None = None  # the comparison with the ONNX child, when one ran

    def to_dict(self) -> dict[str, Any]:
        def sizes(s: Sizes) -> dict[str, int]:
            return {"hidden": s.D, "ffn": s.I, "heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.hd,
                    "layers": s.layers}

        return {"output": str(self.out), "family": self.family, "parent_sizes": sizes(self.parent_sizes),
                "sizes": sizes(self.sizes), "parameters": self.parameters, "notes": self.notes, "check": self.check,
                "config": self.config}

    def summary(self) -> str:
        p, c = self.parent_sizes, self.sizes
        changes = [f"{label} {a} -> {b}" for label, a, b in (
            ("hidden", p.D, c.D), ("ffn", p.I, c.I), ("heads", p.heads, c.heads), ("kv heads", p.kv_heads, c.kv_heads),
            ("layers", p.layers, c.layers)) if a != b]
        lines = [f"wrote {self.out}: {self.family}, {self.parameters} parameters"
                 + (f" ({', '.join(changes)})" if changes else " (same sizes as the parent)")]
        lines += [f"  {note}" for note in self.notes]
        if self.check is not None:
            lines.append(f"  checked: {self.check['summary']}")
        return "\n".join(lines)


def export_hf(child: ModelLike, *, like: str | os.PathLike, out: str | os.PathLike,
              parent: ModelLike | None = None, force: bool = False, check: bool | None = None) -> ExportResult:
    """Write `child` (grown by widen and block from an export of the checkpoint in `like`) as a checkpoint in `out`.

    `parent` is the ONNX export the child was grown from; by default the file of `like` (or of the child's
    folder) whose SHA-256 the child's receipt records. `out` must not exist or be empty (`force` replaces
    it); it is written whole or not at all. `check` loads the written checkpoint with transformers and
    compares its logits with onnxruntime's on the child (None: when transformers and torch are installed);
    a difference raises VerificationFailed and writes nothing. Raises NotApplicable (a child that is no
    longer the architecture, naming the morph or weight) or UsageError (bad input), both in one line.
    """
    if check and not hfcheck.available():
        raise UsageError("comparing the checkpoint with the child needs transformers and torch (pip install "
                         "transformers torch), or --no-check")
    like = Path(like)
    checkpoint = ckpt.read_checkpoint(like)
    # every file export-hf reads must survive the write (a folder replaced under --force holds none of them)
    inputs = [Path(m) for m in (child, parent) if m is not None and not isinstance(m, onnx.ModelProto)]
    target = ckpt.check_output(out, like, force, inputs)
    out = Path(out)
    family = fam.family_of(checkpoint.config, str(like / ckpt.CONFIG))
    child_model, child_name = _load(child, "child")
    history = receipt.history(child_model)
    _check_history(history, child_name, family)
    parent_model, parent_name, other_digest = _find_parent(parent, history, like, child)
    plan = _Plan(family, checkpoint, child_model, child_name, parent_model, parent_name)
    try:
        config, tensors, sizes = plan.run()
    except NotApplicable as exc:
        if other_digest:  # what the receipt says, beside what the weights say
            raise NotApplicable(f"{exc} ({other_digest})") from exc
        raise
    if other_digest:
        plan.notes.append(f"{other_digest}: its weights and names match the checkpoint and the child")
    result = ExportResult(out, family.name, plan.parent_sizes, sizes, config,
                          int(sum(v.size for v in tensors.values())), plan.notes)

    def verify(folder: Path) -> None:
        if check is False:
            return
        if check is None and not hfcheck.available():
            result.notes.append("not compared with the ONNX child: transformers and torch are not installed")
            return
        try:
            result.check = hfcheck.compare(folder, child_model, child_name, source=str(like))
        except NotApplicable as exc:  # the child's inputs or output are not the model's: asked for, an error
            if check:
                raise
            result.notes.append(f"not compared with the ONNX child: {exc}")

    log.info("writing %s", out)
    ckpt.write_checkpoint(target, config, tensors, like, before_commit=verify)
    return result


def _load(model: ModelLike, role: str) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return mio.normalize(model), role
    return mio.load(model, normalize_model=True, lazy=True), str(model)


def _check_history(history: list[dict[str, Any]], child: str, family: Family) -> None:
    if not history:
        raise NotApplicable(f"{child}: has no onnxmorph receipt (no record of the morphs that made it): export-hf "
                            "writes back children that onnxmorph grew, and reads what they are from the receipt")
    steps = [step for record in history for step in record.get("steps") or []]
    for n, step in enumerate(steps, 1):
        name = step.get("pass")
        if name in WRITABLE:
            continue
        params = " ".join(f"{k}={v}" for k, v in sorted((step.get("params") or {}).items()) if k != "seed")
        why = _WHY_NOT.get(name, "is not a growth that keeps the architecture")
        raise NotApplicable(f"{child}: step {n} of {len(steps)} is {name} ({params}), which {why}: a {family.name} "
                            "config cannot express it; export-hf writes back children grown by widen, block and grow "
                            "only")




def _find_parent(parent: ModelLike | None, history: list[dict[str, Any]], like: Path,
                 child: ModelLike) -> tuple[onnx.ModelProto, str, str | None]:
    """The export the child was grown from: `parent`, or the file whose SHA-256 the child's receipt records.

    Returns (model, name, a note when `parent`'s digest is not the receipt's). The digest is a check, not the
    proof: a child grown from a model held in memory records the digest of that model's normalised form,
    which no file has. What decides is the by-value match with the checkpoint and the names in the child.
    """
    wanted = str(history[0].get("parent_sha256"))
    if parent is not None:
        model, name = _load(parent, "parent")
        digest = mio.digest(model)
        other = None if digest == wanted else (f"{name} is not the parent whose SHA-256 the child's receipt records: "
                                               f"{wanted[:12]}..., this one is {digest[:12]}...")
        return model, name, other
    folders = [like] + ([Path(child).resolve().parent] if not isinstance(child, onnx.ModelProto) else [])
    skip = None if isinstance(child, onnx.ModelProto) else Path(child).resolve()
    for folder in dict.fromkeys(f.resolve() for f in folders):
        for path in sorted(folder.glob("*.onnx")):
            if path.resolve() != skip and path.is_file() and mio.file_sha256(path) == wanted:
                log.info("the parent export is %s", path)
                return mio.load(path, normalize_model=True, lazy=True), str(path), None
    raise UsageError(f"no parent export found: pass --parent PARENT.onnx, the export of {like} that the child was "
                     f"grown from (SHA-256 {wanted[:12]}...; looked for *.onnx in {like}"
                     + ("" if isinstance(child, onnx.ModelProto) else f" and {Path(child).parent or '.'}") + ")")


class _Plan:
    """The mapping, sizes and config of one export; `run` computes them (nothing is written here)."""

    def __init__(self, family: Family, checkpoint: ckpt.Checkpoint, child: onnx.ModelProto, child_name: str,
                 parent: onnx.ModelProto, parent_name: str) -> None:
        self.family, self.checkpoint = family, checkpoint
        self.child, self.child_name, self.parent, self.parent_name = child, child_name, parent, parent_name
        self.like = str(checkpoint.folder)
        self.config = checkpoint.config
        self.parent_sizes = fam.parent_sizes(family, self.config, self.like)
        self.notes: list[str] = []

    # ------------------------------------------------------------------ the whole export

    def run(self) -> tuple[dict[str, Any], dict[str, np.ndarray], Sizes]:
        family, tensors = self.family, self.checkpoint.tensors
        for key in family.same_width:
            if self.config.get(key) not in (None, self.parent_sizes.D):
                raise NotApplicable(f"{self.like}: {key} {self.config.get(key)} differs from {family.hidden} "
                                    f"{self.parent_sizes.D}; export-hf writes {family.name} models where they are "
                                    "equal")
        # Tied: the config says so (transformers' default where it does not: the checkpoint then lacks the head).
        absent = all(t not in tensors for t in family.tied)
        tied = bool(family.tied) and bool(self.config.get("tie_word_embeddings", absent))
        fixed = self._solve_parent()
        self.parent_map = matching.match_parent(self.parent, tensors, family, tied and absent, self.parent_name,
                                                self.like)
        # Inserted blocks are read off the graph (their weights are copies under `<block>/morph_block/`),
        # not counted from the receipt: `grow` inserts them too, and a count that missed one would drop a layer.
        copies = {t.name for t in self.child.graph.initializer if matching.is_copy(t.name)}
        layers = self._child_layers(bool(copies))
        grown, origin = self._follow(layers)
        unused = copies - {name for _, renames in layers for name in renames.values()}
        if unused:
            raise NotApplicable(f"{self.child_name}: the inserted weight '{sorted(unused)[0]}' belongs to no layer "
                                "export-hf can number: the checkpoint would lose it")
        if tied and absent:
            grown, origin = self._tie(grown, origin)
        sizes = self._solve_child(grown, origin, fixed, len(layers))
        self._check_heads()
        config = dict(self.config)
        self._epsilon(config)
        if family.embed_scale and sizes.D != self.parent_sizes.D:
            grown[family.embed] = self._rescaled_embedding(grown[family.embed], sizes.D)
        sizes = self._pad_heads(grown, sizes)
        if tied:
            tied = self._still_tied(grown)
            if not tied:
                config["tie_word_embeddings"] = False
        if tied:
            for target in family.tied:
                grown.pop(target, None)
        self._sizes_to_config(config, sizes, [j for j, _ in layers])
        out = {key: values.astype(tensors[origin[key]].dtype, copy=False) for key, values in grown.items()}
        return config, out, sizes

    # ------------------------------------------------------------------ parent: sizes and the shape rules

    def _solve_parent(self) -> dict[str, int]:
        """Every size symbol of the parent checkpoint, solved from its shapes and checked against its config."""
        p = self.parent_sizes
        # The layer count, as every size, is checked against the tensors before anything is sized by it (a
        # config's num_hidden_layers of 10**12 would otherwise number that many layers).
        found = {match[0] for key in self.checkpoint.tensors if (match := self.family.layer_match(key))}
        if len(found) != p.layers or (found and (min(found), max(found)) != (0, p.layers - 1)):
            raise NotApplicable(f"{self.like}: its tensors hold {len(found)} layers "
                                f"({self.family.layers}.N for N in {_ranges(found)}) where config.json's "
                                f"{self.family.num_layers} says {p.layers}")
        solved = _solve(self.family, self.checkpoint.tensors, {"hd": p.hd}, f"{self.like}'s", None)
        for symbol, value in (("D", p.D), ("I", p.I), ("Q", p.Q), ("KV", p.KV)):
            if solved.get(symbol, value) != value:
                raise NotApplicable(f"{self.like}: its tensors give a {_SIZE_NAMES[symbol]} of {solved[symbol]} "
                                    f"where config.json says {value}: export-hf does not know this "
                                    f"{self.family.name} variant")
        return {k: v for k, v in solved.items() if k not in GROWN}

    # ------------------------------------------------------------------ the child's layers and weights

    def _child_layers(self, inserted: bool) -> list[tuple[int, dict[str, str]]]:
        """Per layer of the child: the parent layer it is or copies, and the child's names of that layer's weights."""
        count = self.parent_sizes.layers
        if not inserted:
            return [(j, {}) for j in range(count)]
        owners = self.parent_map.layer_sources(self.family)
        found = mblocks.model_blocks(self.child)
        layers = []
        for block in found:
            names = {t.name for n in block.nodes for t in n.inputs if isinstance(t, gs.Constant) and t.name}
            renames = {matching.origin(n): n for n in names}
            sources = {next(iter(owners[o])) for o in renames if len(owners.get(o, ())) == 1}
            if len(sources) != 1:
                continue  # not one of the model's layers (a block the analysis sees elsewhere)
            layers.append((sources.pop(), renames))
        originals = [j for j, renames in layers if not any(matching.is_copy(n) for n in renames.values())]
        if originals != list(range(count)):
            raise NotApplicable(f"{self.child_name}: its blocks ({len(layers)} found) are not the parent's {count} "
                                "layers in order with inserted copies between them: cannot number the layers "
                                "of the checkpoint")
        return layers

    def _follow(self, layers: list[tuple[int, dict[str, str]]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Each parameter's grown value in the child, renumbered around inserted layers (and the key it comes from)."""
        family = self.family
        inits = {t.name: t for t in self.child.graph.initializer}
        grown: dict[str, np.ndarray] = {}
        origin: dict[str, str] = {}
        by_layer: dict[int, list[int]] = defaultdict(list)
        for i, (j, _) in enumerate(layers):
            by_layer[j].append(i)
        for key in self.parent_map.kept:
            grown[key], origin[key] = self.checkpoint.tensors[key], key
        for key, sources in self.parent_map.sources.items():
            match = family.layer_match(key)
            if match is None:
                grown[key], origin[key] = self._value(key, key, sources, {}, inits), key
                continue
            j, rest = match
            for i in by_layer[j]:
                new_key = family.layer_key(i, rest)
                renames = layers[i][1]
                if any(matching.is_copy(n) for n in renames.values()):  # a copy reads its own weights only
                    missing = [s.init for s in sources if s.init not in renames]
                    if missing:
                        raise NotApplicable(f"{self.child_name}: layer {i} (a copy of layer {j}) has no copy of "
                                            f"'{missing[0]}' ({key}): cannot tell what its {rest} is")
                grown[new_key] = self._value(new_key, key, sources, renames, inits)
                origin[new_key] = key
        return grown, origin

    def _value(self, key: str, parent_key: str, sources: list[matching.Source], renames: Mapping[str, str],
               inits: Mapping[str, onnx.TensorProto]) -> np.ndarray:
        values = []
        for s in sources:
            name = renames.get(s.init, s.init)
            if name not in inits:
                raise NotApplicable(f"{self.child_name}: has no initializer '{name}', which holds {parent_key} in the "
                                    "parent: a morph replaced it, so export-hf cannot tell where that weight went")
            values.append(matching.from_export(matching.array(inits[name]), s.form))
        if any(v.shape != values[0].shape or not np.array_equal(v, values[0]) for v in values[1:]):
            names = ", ".join(f"'{renames.get(s.init, s.init)}'" for s in sources)
            raise NotApplicable(f"{self.child_name}: {names} were equal in the parent, where each could be {key}, and "
                                "differ now: cannot tell which one is")
        return values[0]

    def _tie(self, grown: dict[str, np.ndarray],
             origin: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The tied targets' own values: the head the export kept apart, or else the source's."""
        inits = {t.name: t for t in self.child.graph.initializer}
        for target, source in self.family.tied.items():
            if source not in grown:  # a model without that head (a bare encoder)
                continue
            heads = self.parent_map.heads.get(target)
            grown[target] = self._value(target, target, heads, {}, inits) if heads else grown[source]
            origin[target] = source
        return grown, origin

    def _still_tied(self, grown: dict[str, np.ndarray]) -> bool:
        differ = [t for t, s in self.family.tied.items() if t in grown and s in grown
                  and (grown[t].shape != grown[s].shape or not np.array_equal(grown[t], grown[s]))]
        if differ:
            self.notes.append(f"tie_word_embeddings: false ({differ[0]} written apart: after growth the output head "
                              f"is no longer the embedding {self.family.tied[differ[0]]})")
        return not differ

    # ------------------------------------------------------------------ sizes

    def _solve_child(self, grown: Mapping[str, np.ndarray], origin: Mapping[str, str], fixed: Mapping[str, int],
                     count: int) -> Sizes:
        solved = _solve(self.family, grown, dict(fixed), f"{self.child_name}'s", origin,
                        {k: self.checkpoint.tensors[k].shape for k in self.checkpoint.tensors})
        p = self.parent_sizes
        query = solved.get("Q", p.Q)
        # A family without grouped-query attention has as many key/value heads as query heads.
        kv = solved.get("KV", p.KV) if self.family.kv_heads else query
        sizes = Sizes(D=solved.get("D", p.D), I=solved.get("I", p.I), Q=query, KV=kv, hd=p.hd, layers=count)
        for symbol in ("Q", "KV"):
            if getattr(sizes, symbol) % p.hd:
                raise NotApplicable(f"{self.child_name}: its {_SIZE_NAMES[symbol]} is {getattr(sizes, symbol)}, not a "
                                    f"multiple of the head size {p.hd}")
        if sizes.heads % sizes.kv_heads:
            raise NotApplicable(f"{self.child_name}: {sizes.heads} query heads do not share {sizes.kv_heads} key/value "
                                "heads evenly")
        return sizes

    def _check_heads(self) -> None:
        """Every attention of the child splits its heads as the parent's do (growth adds heads, never widens one)."""
        def head_sizes(model: onnx.ModelProto) -> list[tuple[str, int | None]]:
            analysis = mgraph.Analysis(model)
            modules = mattention.attention_modules(analysis, analysis.view, mblocks.model_blocks(analysis))
            return [(m["module"] or m["query"], m["head_dim"]) for m in modules]

        try:
            before = {size for _, size in head_sizes(self.parent) if size}
            after = head_sizes(self.child)
        except OnnxMorphError:
            return  # no attention found to check: the shapes alone decide
        for module, size in after:
            if size and before and size not in before:
                raise NotApplicable(f"{self.child_name}: attention {module} splits its heads into {size} channels "
                                    f"where the parent's split into {sorted(before)[0]}: a config holds one head size")

    def _sizes_to_config(self, config: dict[str, Any], sizes: Sizes, layer_origins: list[int]) -> None:
        family = self.family
        config[family.hidden] = sizes.D
        config[family.ffn] = sizes.I
        config[family.heads] = sizes.heads
        if family.kv_heads:
            config[family.kv_heads] = sizes.kv_heads
        if family.head_dim:
            config[family.head_dim] = sizes.hd
        for key in family.same_width:
            if key in config:
                config[key] = sizes.D
        config[family.num_layers] = sizes.layers
        layer_types = config.get("layer_types")
        if isinstance(layer_types, list) and len(layer_types) == self.parent_sizes.layers:
            config["layer_types"] = [layer_types[j] for j in layer_origins]  # a copy attends as its source does
        elif layer_origins != list(range(self.parent_sizes.layers)):
            per_layer = [k for k, v in config.items() if isinstance(v, list) and len(v) == self.parent_sizes.layers
                         and "layer" in k]
            if per_layer:
                raise NotApplicable(f"{self.like}: config.json's {per_layer[0]} has one entry per layer, and export-hf "
                                    "does not know what the inserted layers' entries are")

    # ------------------------------------------------------------------ what the config derives from the sizes

    def _epsilon(self, config: dict[str, Any]) -> None:
        """The norms' epsilon: average expansion scales it; one value for every norm goes in the config."""
        before, after = _epsilons(self.parent), _epsilons(self.child)
        if set(after.values()) == set(before.values()):
            return
        values = sorted(set(after.values()))
        if len(values) > 1:
            first = {v: n for n, v in after.items()}
            listed = ", ".join(f"{v:.6g} ('{first[v]}')" for v in values[:3])
            raise NotApplicable(f"{self.child_name}: its norms have epsilons {listed}: a {self.family.name} config "
                                "holds one (average expansion scales the stream's norms' epsilon, not the others')")
        if not self.family.eps:
            raise NotApplicable(f"{self.child_name}: its norms' epsilon is {values[0]:.6g}, the parent's "
                                f"{sorted(set(before.values()))[0]:.6g}, and {self.family.name} keeps it in code, "
                                "not in its config (average expansion scaled it: grow the hidden width by a whole "
                                "factor)")
        for key in self.family.eps:
            config[key] = float(values[0])
        self.notes.append(f"{self.family.eps[0]}: {float(values[0]):.6g} (average expansion scaled the norms' "
                          "epsilon with the stream's variance)")

    def _rescaled_embedding(self, embedding: np.ndarray, hidden: int) -> np.ndarray:
        """Gemma multiplies embeddings by sqrt(hidden_size): the grown graph keeps the parent's factor, the config
        derives the new one, so the embedding absorbs the ratio."""
        old = np.float32(np.sqrt(self.parent_sizes.D))
        new = np.float32(np.sqrt(hidden))
        self.notes.append(f"{self.family.embed}: times sqrt({self.parent_sizes.D})/sqrt({hidden}) (the family "
                          "multiplies embeddings by sqrt(hidden_size), which the graph keeps at the parent's)")
        return (embedding.astype(np.float64) * (float(old) / float(new))).astype(np.float32)

    def _pad_heads(self, grown: dict[str, np.ndarray], sizes: Sizes) -> Sizes:
        """Add heads where the config cannot hold the child's: each new head reads as an existing one does (so
        that it trains) and writes through output-projection columns of zero, which keeps the function.

        A family that derives head_dim = hidden / heads needs heads that fill the hidden width; one whose
        config validator wants hidden_size a multiple of the heads gets the fewest whole groups of query
        heads (with their key/value head) that make it so.
        """
        family, name = self.family, self.child_name
        group = sizes.heads // sizes.kv_heads
        if family.head_dim is None:
            if sizes.Q > sizes.D or sizes.D % sizes.hd:
                raise NotApplicable(
                    f"{name}: {sizes.heads} heads of {sizes.hd} ({sizes.Q} channels) in a hidden width of {sizes.D}: "
                    f"{family.name} derives head_dim as hidden / heads, so its heads must fill the hidden width "
                    f"(grow the hidden width to a multiple of {sizes.hd} that is at least {sizes.Q})")
            heads = sizes.D // sizes.hd
        elif family.heads_divide_hidden:
            heads = next(h for h in range(sizes.heads, sizes.D + 1) if h % group == 0 and sizes.D % h == 0) \
                if sizes.D % group == 0 else 0
            if not heads:
                raise NotApplicable(f"{name}: no number of heads from {sizes.heads} up divides the hidden width "
                                    f"{sizes.D} in groups of {group}, which a {family.name} config requires")
        else:
            return sizes
        if heads == sizes.heads:
            return sizes
        kv_heads = heads // group
        for i in range(sizes.layers):
            _pad_layer(grown, family, i, sizes, heads, kv_heads)
        self.notes.append(f"{family.heads}: {heads} ({heads - sizes.heads} heads added per layer, reading as existing "
                          f"ones do and writing zero, because "
                          + ("the family derives head_dim = hidden / heads)" if family.head_dim is None else
                             f"a {family.name} config wants hidden_size a multiple of the heads)"))
        return Sizes(D=sizes.D, I=sizes.I, Q=heads * sizes.hd, KV=kv_heads * sizes.hd, hd=sizes.hd,
                     layers=sizes.layers)


def _solve(family: Family, tensors: Mapping[str, np.ndarray], known: dict[str, int], whose: str,
           origin: Mapping[str, str] | None, parent_shapes: Mapping[str, tuple[int, ...]] | None = None
           ) -> dict[str, int]:
    """Solve the size symbols from the tensors' shapes: each axis is a sum of terms (families.terms).

    A parameter without a rule must keep the parent's shape. Two tensors that give a symbol different
    values (one layer's FFN wider than another's) are refused, naming both.
    """
    axes: list[tuple[str, int, str, int]] = []  # (key, axis, rule, size)
    for key, values in tensors.items():
        rule = family.shape_rule(key)
        if rule is None:
            before = parent_shapes.get(origin[key]) if parent_shapes is not None and origin is not None else None
            if before is not None and tuple(values.shape) != tuple(before):
                raise NotApplicable(f"{whose} {key} is {list(values.shape)}, the parent's {list(before)}: no size of a "
                                    f"{family.name} config says how wide it is")
            continue
        parts = rule.split(",")
        if len(parts) != values.ndim:
            raise NotApplicable(f"{whose} {key} has {values.ndim} axes where {family.name}'s has {len(parts)}")
        axes += [(key, k, part, int(size)) for k, (part, size) in enumerate(zip(parts, values.shape))]
    given = dict(known)
    first: dict[str, tuple[str, int]] = {}
    progress = True
    while progress:
        progress = False
        for key, k, part, size in axes:
            terms = fam.terms(part)
            unknown = {s for _, s in terms if s and s not in known}
            if len(unknown) != 1:
                continue
            symbol = unknown.pop()
            coefficient = sum(c for c, s in terms if s == symbol)
            rest = sum(c * (known[s] if s else 1) for c, s in terms if s != symbol)
            if (size - rest) % coefficient or size <= rest:
                raise NotApplicable(f"{whose} {key} is {size} wide on axis {k}, which no {symbol} makes ({part})")
            known[symbol] = (size - rest) // coefficient
            first[symbol] = (key, k)
            progress = True
    for key, k, part, size in axes:
        terms = fam.terms(part)
        expected = sum(c * (known[s] if s else 1) for c, s in terms)
        if expected != size:
            symbol = next((s for _, s in terms if s in first), None)
            if symbol is not None:
                other, axis = first[symbol]
                what = _SIZE_NAMES.get(symbol, symbol)
                raise NotApplicable(f"{whose} {key} is {size} wide on axis {k} ({part}) where {other} makes the "
                                    f"{what} {known[symbol]}: a {family.name} config holds one {what} (grow "
                                    "the layer that holds it to match)")
            symbol = next((s for _, s in terms if s in given), part)
            raise NotApplicable(f"{whose} {key} is {size} wide on axis {k} ({part}) where the parent's is {expected}: "
                                f"a {family.name} config does not let {symbol} change")
    return known


def _ranges(numbers: set[int]) -> str:
    """`0-3, 7` for {0, 1, 2, 3, 7}, shortened after a few runs; `none` for an empty set."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    shown = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:4])
    return (shown + (", ..." if len(runs) > 4 else "")) if runs else "none"


def _epsilons(model: onnx.ModelProto) -> dict[str, float]:
    """Norm node -> its epsilon (float32), for fused norms and decomposed RMSNorm."""
    view = mgraph.read_view(model)
    nodes = {n.name: n for n in view.nodes}
    found = {}
    for node in view.nodes:
        if node.op in FUSED_NORMS:
            found[node.name] = float(np.float32(node.attrs.get("epsilon", 1e-5)))
        elif node.op == "ReduceMean":
            parts = averaging.decomposed_rms(node)
            if parts is not None:
                (add, k), _ = parts
                tensor = nodes[add].inputs[k]
                found[add] = float(np.asarray(mgraph.values(tensor), dtype=np.float32).reshape(-1)[0])
    return found


def _pad_layer(grown: dict[str, np.ndarray], family: Family, i: int, sizes: Sizes, new_heads: int,
               new_kv: int) -> None:
    """Pad layer i's attention to new_heads query and new_kv key/value heads, in the family's layout.

    New query heads come in whole groups after the old ones, with their new key/value head (transformers
    gives query head h the key/value head h // group): each copies an existing head's rows.
    """
    heads, kv, hd = sizes.heads, sizes.kv_heads, sizes.hd

    def rows(values: np.ndarray, have: int, want: int, group: int = 1) -> np.ndarray:
        """`values` ([have * group * hd, ...]) with copies of its first heads appended along axis 0."""
        blocks = values.reshape(have, group * hd, *values.shape[1:])
        order = [h % have for h in range(have, want)]
        return np.concatenate([blocks, blocks[order]]).reshape(want * group * hd, *values.shape[1:])

    def zero_columns(values: np.ndarray) -> np.ndarray:
        return np.concatenate([values, np.zeros((values.shape[0], (new_heads - heads) * hd), values.dtype)], axis=1)

    def key(name: str) -> str:
        return family.layer_key(i, name)

    if family.attention == "separate":
        q, k, v, o = family.projections
        for name, have, want in ((q, heads, new_heads), (k, kv, new_kv), (v, kv, new_kv)):
            for part in ("weight", "bias"):
                if key(f"{name}.{part}") in grown:
                    grown[key(f"{name}.{part}")] = rows(grown[key(f"{name}.{part}")], have, want)
        grown[key(f"{o}.weight")] = zero_columns(grown[key(f"{o}.weight")])
    elif family.attention == "gpt2":  # Conv1D [in, out]: q, k, v side by side on the columns
        fused, o = family.projections
        w = grown[key(f"{fused}.weight")]
        grown[key(f"{fused}.weight")] = np.concatenate(
            [rows(p.T, heads, new_heads).T for p in np.split(w, 3, axis=1)], axis=1)
        b = grown[key(f"{fused}.bias")]
        grown[key(f"{fused}.bias")] = np.concatenate([rows(p, heads, new_heads) for p in np.split(b, 3)])
        grown[key(f"{o}.weight")] = zero_columns(grown[key(f"{o}.weight")].T).T
    elif family.attention == "neox":  # per head [q_h, k_h, v_h] rows
        fused, o = family.projections
        for part in ("weight", "bias"):
            if key(f"{fused}.{part}") in grown:
                grown[key(f"{fused}.{part}")] = rows(grown[key(f"{fused}.{part}")], heads, new_heads, group=3)
        grown[key(f"{o}.weight")] = zero_columns(grown[key(f"{o}.weight")])
    else:
        raise NotApplicable(f"{family.name}: export-hf cannot add heads in its {family.attention} layout")
