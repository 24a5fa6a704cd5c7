"""Conv geometry in one place: read it off a node, write it back, and derive the geometries morphs need.

Every morph that builds or changes a convolution keeps the same input pixels under the same
weights; what changes is where the padding and the stride sit. The rules, all on
`ConvGeometry` (explicit pads, `auto_pad` resolved):

* `pair_geometries`: one conv split into two (the depth morph, chains of the subnet morph);
* `chain_geometries`: repeated splits, `depth` convs;
* `inner_geometry`: a smaller kernel centred inside the parent's (parallel and residual branches);
* `resized_geometry`: the same conv with a larger or smaller kernel (the kernel morph).

Pure Python over tuples, below the solvers (which place kernels by `centred_offsets`); reading takes
any node with ONNX attributes (an onnx-graphsurgeon node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnxmorph.errors import NotApplicable

Shapes = Mapping[str, "tuple[int | None, ...] | None"]


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv's kernel, explicit pads (auto_pad resolved), strides, dilations and group count."""

    kernel: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int

    @property
    def pads(self) -> list[int]:
        """The ONNX `pads` attribute: all begins, then all ends."""
        return [*self.pads_begin, *self.pads_end]

    @property
    def rank(self) -> int:
        """Spatial axes."""
        return len(self.kernel)

    def with_pads(self, begin: Sequence[int], end: Sequence[int]) -> ConvGeometry:
        return ConvGeometry(self.kernel, tuple(begin), tuple(end), self.strides, self.dilations, self.group)


def _same_pads(node: Any, auto_pad: str, kernel: tuple[int, ...], strides: tuple[int, ...],
               dilations: tuple[int, ...], shapes: Shapes | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Explicit pads of `auto_pad` SAME_UPPER/SAME_LOWER (strided axes need the input's size)."""
    nd = len(kernel)
    shape = (shapes or {}).get(node.inputs[0].name)
    begin, end = [], []
    for axis in range(nd):
        n = shape[2 + axis] if shape is not None and len(shape) == nd + 2 else None
        if strides[axis] == 1:
            total = (kernel[axis] - 1) * dilations[axis]
        elif n is None:
            raise NotApplicable(
                f"layer '{node.name}': auto_pad {auto_pad} with stride {strides[axis]} needs the input's "
                f"spatial size, which shape inference cannot tell for '{node.inputs[0].name}'"
            )
        else:
            out = -(-n // strides[axis])
            total = max(0, (out - 1) * strides[axis] + (kernel[axis] - 1) * dilations[axis] + 1 - n)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return tuple(begin), tuple(end)


def conv_geometry(node: Any, shapes: Shapes | None = None) -> ConvGeometry:
    """The geometry of Conv `node`; `auto_pad` SAME_* needs the input's spatial shape when strided.

    Raises NotApplicable when the padding cannot be made explicit (unknown input size).
    """
    weight_shape = tuple(int(d) for d in node.inputs[1].shape)
    nd = len(weight_shape) - 2
    kernel = tuple(int(k) for k in node.attrs.get("kernel_shape", weight_shape[2:]))
    strides = tuple(int(s) for s in node.attrs.get("strides", [1] * nd))
    dilations = tuple(int(d) for d in node.attrs.get("dilations", [1] * nd))
    group = int(node.attrs.get("group", 1))
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in node.attrs.get("pads", [0] * (2 * nd))]
        begin, end = tuple(pads[:nd]), tuple(pads[nd:])
    elif auto_pad == "VALID":
        begin = end = (0,) * nd
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = _same_pads(node, auto_pad, kernel, strides, dilations, shapes)
    else:
        raise NotApplicable(f"layer '{node.name}': unknown auto_pad {auto_pad!r}")
    return ConvGeometry(kernel, begin, end, strides, dilations, group)


def set_conv_geometry(node: Any, geometry: ConvGeometry) -> None:
    """Write `geometry` into Conv `node`'s attributes, with explicit pads (auto_pad dropped)."""
    node.attrs.pop("auto_pad", None)
    node.attrs["kernel_shape"] = list(geometry.kernel)
    node.attrs["pads"] = geometry.pads
    node.attrs["strides"] = list(geometry.strides)
    node.attrs["dilations"] = list(geometry.dilations)
    node.attrs["group"] = geometry.group


def pair_geometries(parent: ConvGeometry, k2: Sequence[int]) -> tuple[ConvGeometry, ConvGeometry]:
    """Geometries of the two convs replacing `parent`, layer 2 having kernel `k2`; exact on every pixel.

    Layer 1 keeps the parent's kernel and dilation, stride 1, and carries all the padding:
    `P_begin + dilation * lo` / `P_end + dilation * hi` with `lo = (K2 - 1) // 2`, `hi = K2 - 1 - lo`
    (the placement of `solvers.target_kernel`). Layer 2 has pads 0, the parent's stride and dilation,
    so it never reads a zero-padded intermediate value and every output, border included, sums the
    same input pixels with the same composite weights as the parent.
    """
    k2 = tuple(int(k) for k in k2)
    lo = tuple((k - 1) // 2 for k in k2)
    hi = tuple(k - 1 - a for k, a in zip(k2, lo))
    d = parent.dilations
    first = ConvGeometry(
        kernel=parent.kernel,
        pads_begin=tuple(p + di * a for p, di, a in zip(parent.pads_begin, d, lo)),
        pads_end=tuple(p + di * b for p, di, b in zip(parent.pads_end, d, hi)),
        strides=(1,) * len(k2),
        dilations=d,
        group=parent.group,
    )
    second = ConvGeometry(k2, (0,) * len(k2), (0,) * len(k2), parent.strides, d, parent.group)
    return first, second


def chain_geometries(parent: ConvGeometry, depth: int, k2: Sequence[int]) -> list[ConvGeometry]:
    """Geometries of a chain of `depth` convs replacing `parent` (each split as `pair_geometries`)."""
    out: list[ConvGeometry] = []
    rest = parent
    for _ in range(depth - 1):
        first, rest = pair_geometries(rest, k2)
        out.append(first)
    out.append(rest)
    return out


def inner_geometry(parent: ConvGeometry, inner: Sequence[int]) -> ConvGeometry:
    """Geometry of a conv with the smaller, centred kernel `inner` that reads what `parent`'s taps read.

    Its pads may come out negative (an unpadded parent): `build.crop_input` cuts those pixels first.
    """
    off = centred_offsets(parent.kernel, inner)
    d = parent.dilations
    begin = tuple(p - di * o for p, di, o in zip(parent.pads_begin, d, off))
    end = tuple(p - di * (k - s - o) for p, di, k, s, o in zip(parent.pads_end, d, parent.kernel, inner, off))
    return ConvGeometry(tuple(inner), begin, end, parent.strides, d, parent.group)


def centred_offsets(kernel: Sequence[int], inner: Sequence[int]) -> tuple[int, ...]:
    """Where a smaller kernel `inner` sits inside `kernel`: `(K - k) // 2` per axis (split_parallel's rule)."""
    return tuple((a - b) // 2 for a, b in zip(kernel, inner))


def pointwise(rank: int, group: int = 1, strides: Sequence[int] | None = None) -> ConvGeometry:
    """A 1x..x1 conv without padding (a projection), with `strides` (default 1)."""
    ones, zeros = (1,) * rank, (0,) * rank
    return ConvGeometry(ones, zeros, zeros, tuple(strides) if strides is not None else ones, ones, group)


def kernel_offsets(old: Sequence[int], new: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per axis, taps added before (`lo`) and after (`hi`): `lo = (K' - K) // 2`, `hi` the rest.

    Negative values mean taps removed (a shrink); an odd difference puts the extra tap after.
    """
    lo = tuple((n - o) // 2 for o, n in zip(old, new))
    hi = tuple((n - o) - a for o, n, a in zip(old, new, lo))
    return lo, hi


def resized_geometry(geometry: ConvGeometry, new: Sequence[int]) -> ConvGeometry:
    """The conv geometry that keeps every output after the kernel becomes `new` (pads move by dilation*taps)."""
    lo, hi = kernel_offsets(geometry.kernel, new)
    begin = tuple(p + d * a for p, d, a in zip(geometry.pads_begin, geometry.dilations, lo))
    end = tuple(p + d * b for p, d, b in zip(geometry.pads_end, geometry.dilations, hi))
    return ConvGeometry(tuple(new), begin, end, geometry.strides, geometry.dilations, geometry.group)


def shown(kernel: Sequence[int]) -> str:
    """A kernel as the CLI writes it: `3x3`, `1x7`, `1` for none."""
    return "x".join(map(str, kernel)) or "1"
