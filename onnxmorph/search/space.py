"""The morphs a search draws from: `NAME:key=a|b,...` choices, and random applicable passes for a model."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxmorph.contract.passinfra import MorphPass
from onnxmorph.contract.registry import get_pass, load
from onnxmorph.errors import NotApplicable, OnnxMorphError, UsageError
from onnxmorph.graph import core as mgraph
from onnxmorph.limits import quote

# The search picks these itself: the layer (or the skip's two tensors) and each pass's seed.
DRAWN = ("layer", "source", "target", "seed")
# A morph that picks a random layer and random parameters often draws one that does not apply
# (a classifier cannot widen; a 3x3 kernel on a Gemm); it tries again, this many times in all.
MAX_TRIES = 40
MAX_REPEATS = 10
# widen's factor of a layer's width: checked when the space is read, not when a draw meets it
# (NaN passes every comparison but this one; 1e308 overflows the width).
MAX_FACTOR = 64


@dataclass(frozen=True)
class MorphChoice:
    """One morph of the search space: its name and, per parameter, the values drawn from (uniformly)."""

    morph: str
    params: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.morph
        return self.morph + ":" + ",".join(f"{k}={'|'.join(map(str, v))}" for k, v in sorted(self.params.items()))


# widen draws a factor of the layer's current width; subnet draws a residual module; skip adds.
DEFAULT_SPACE_TEXT = ("deepen", "widen:factor=1.5|2", "kernel", "subnet:kind=residual", "skip:mode=add")


def default_space() -> list[MorphChoice]:
    """The default morphs, those of DEFAULT_SPACE_TEXT that are registered."""
    return [parse_choice(text) for text in DEFAULT_SPACE_TEXT if text.split(":")[0] in load()]


def _value(text: str) -> Any:
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def parse_choice(text: str) -> MorphChoice:
    """`widen:factor=1.5|2,method=netmorph|lemon` -> MorphChoice; checks names and values."""
    name, _, rest = text.partition(":")
    name = name.strip()
    try:
        cls = get_pass(name)
    except UsageError as exc:
        raise UsageError(f"--morphs {text!r}: {exc}") from None
    params: dict[str, tuple[Any, ...]] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, values = item.partition("=")
        choices = tuple(_value(v.strip()) for v in values.split("|") if v.strip())
        if not sep or not choices:
            raise UsageError(f"--morphs {text!r}: expected key=value[|value...], got {item!r}")
        params[key.strip().replace("-", "_")] = choices
    choice = MorphChoice(name, params)
    _check_choice(cls, choice, text)
    return choice


def as_choices(space: Sequence[MorphChoice | str | dict[str, Any]] | None) -> list[MorphChoice]:
    """A search space from MorphChoices, `NAME:key=a|b` strings or dicts {"morph": NAME, key: value(s)}."""
    if space is None:
        return default_space()
    choices = []
    for item in space:
        if isinstance(item, MorphChoice):
            choice = item
        elif isinstance(item, str):
            choice = parse_choice(item)
        elif isinstance(item, dict) and "morph" in item:
            params = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in item.items() if k != "morph"}
            choice = MorphChoice(str(item["morph"]), params)
            _check_choice(get_pass(choice.morph), choice, str(item))
        else:
            raise UsageError(f"a morph of the search space must be 'NAME[:key=a|b,...]' or a dict, not {item!r}")
        choices.append(choice)
    if not choices:
        raise UsageError("the search space holds no morph")
    return choices


def _check_choice(cls: type[MorphPass], choice: MorphChoice, text: str) -> None:
    """Refuse unknown keys and values the pass would refuse, before any search starts."""
    names = {p.name for p in cls.params}
    allowed = (names - set(DRAWN)) | ({"factor"} if "width" in names else set())
    for key, values in choice.params.items():
        if key not in allowed:
            raise UsageError(f"--morphs {text!r}: {choice.morph} has no parameter {key!r} that a search may set "
                             f"(it may set: {', '.join(sorted(allowed)) or 'none'})")
        for value in values:
            if key == "factor":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 < value <= MAX_FACTOR:
                    raise UsageError(f"--morphs {quote(repr(text), 80)}: factor must be a number above 1 and at "
                                     f"most {MAX_FACTOR}, not {quote(repr(value), 40)}")
                continue
            try:
                cls(**{**_placeholders(cls), key: value})
            except UsageError as exc:
                raise UsageError(f"--morphs {text!r}: {exc}") from None


def _placeholders(cls: type[MorphPass]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in cls.params:
        if p.required:
            values[p.name] = p.choices[0] if p.choices else ("x" if p.name in DRAWN else 1)
    return values


# --------------------------------------------------------------------------- drawing passes


def propose(model: onnx.ModelProto, rng: np.random.Generator, space: Sequence[MorphChoice],
            count: int = 1, avoid: Collection[str] = ()) -> list[MorphPass]:
    """`count` random passes from `space` that apply one after the other to `model`.

    Each pass is a random morph of the space on a random layer (or pair of tensors for a skip)
    with random parameters from its choices; `requires()` decides whether it applies, and a draw
    that does not is replaced by another (up to MAX_TRIES). Raises NotApplicable when none applies.
    A chain whose `signature` is in `avoid` (a sibling has it) is drawn again, up to MAX_REPEATS
    times; after that the repeat is kept (its new weights still differ: other seeds).
    """
    for _ in range(MAX_REPEATS):
        passes: list[MorphPass] = []
        current = model
        for k in range(count):
            step = _applicable(current, rng, space)
            passes.append(step)
            if k + 1 < count:
                current = step.apply(current).model
        if signature(passes) not in avoid:
            break
    return passes


def signature(passes: Sequence[MorphPass]) -> str:
    """What a chain of passes does, seeds left out: two chains with one signature make the same architecture."""
    return " + ".join(f"{p.name}({sorted((k, v) for k, v in p.config.items() if k != 'seed')})" for p in passes)


def _applicable(model: onnx.ModelProto, rng: np.random.Generator, space: Sequence[MorphChoice]) -> MorphPass:
    model = mgraph.Analysis(model)  # one view and shape inference for every draw
    layers = mgraph.layers(model.view)
    reasons: list[str] = []
    for _ in range(MAX_TRIES):
        choice = space[int(rng.integers(len(space)))]
        try:
            step = _draw(choice, model, layers, rng)
            step.requires(model)
        except (NotApplicable, UsageError) as exc:
            reasons.append(str(exc))
            continue
        return step
    names = ", ".join(sorted({c.morph for c in space}))
    raise NotApplicable(f"no morph of the search space ({names}) applied in {MAX_TRIES} random draws; "
                        f"the last said: {reasons[-1]}")


def _pick(values: Sequence[Any], rng: np.random.Generator) -> Any:
    return values[int(rng.integers(len(values)))]


def _draw(choice: MorphChoice, model: onnx.ModelProto, layers: list[mgraph.LayerInfo],
          rng: np.random.Generator) -> MorphPass:
    cls = load()[choice.morph]
    names = {p.name for p in cls.params}
    params = {key: _pick(values, rng) for key, values in sorted(choice.params.items())}
    if "layer" in names:
        layer, defaults = _random_layer(cls, model, layers, rng)
        if layer.op != "Conv":
            # Kernel sizes are for Conv layers; a Gemm or MatMul takes the morph without one.
            params.pop("kernel", None)
        params = {**defaults, **params}
        factor = params.pop("factor", None)
        if factor is not None:
            params["width"] = _scaled_width(model, params["layer"], factor)
    elif {"source", "target"} <= names:
        params.update(_tensor_pair(model, layers, rng))
    if "seed" in names:
        params["seed"] = int(rng.integers(2**31 - 1))
    return cls(**params)


def _random_layer(cls: type[MorphPass], model: onnx.ModelProto, layers: list[mgraph.LayerInfo],
                  rng: np.random.Generator) -> tuple[mgraph.LayerInfo, dict[str, Any]]:
    """A random layer the morph is about (its `probe`), with the defaults `inspect` would use for it."""
    probes = []
    for layer in layers:
        try:
            probe = cls.probe(model, layer)
        except OnnxMorphError:
            probe = None
        if probe is not None:
            probes.append((layer, probe))
    if not probes:
        raise NotApplicable(f"{cls.name}: no layer of the model is of a kind it morphs")
    layer, probe = probes[int(rng.integers(len(probes)))]
    return layer, {k: v for k, v in probe.config.items() if v is not None and k != "seed"}


def _scaled_width(model: onnx.ModelProto, layer: str, factor: float) -> int:
    view = mgraph.read_view(model)
    node = mgraph.find_layer(view, layer)
    shape = mgraph.tensor_shapes(model).get(node.outputs[0].name)
    axis = -1 if node.op == "MatMul" else 1
    if not shape or len(shape) < 2 or shape[axis] is None:
        raise NotApplicable(f"layer '{layer}': its number of output channels is unknown")
    old = int(shape[axis])
    return max(old + 1, math.ceil(old * float(factor)))


def _tensor_pair(model: onnx.ModelProto, layers: list[mgraph.LayerInfo],
                 rng: np.random.Generator) -> dict[str, str]:
    """Two layer outputs, the first computed before the second (`requires` checks the rest)."""
    outputs = [layer.output for layer in layers]
    if len(outputs) < 2:
        raise NotApplicable("skip: the model has fewer than two layers to connect")
    target = int(rng.integers(1, len(outputs)))
    source = int(rng.integers(target))
    return {"source": outputs[source], "target": outputs[target]}
