"""The morph passes, one module per morph type; importing this fills onnxmorph's registry."""

from onnxmorph.passes import (
    block,  # noqa: F401
    deepen,  # noqa: F401
    grow,  # noqa: F401
    kernel,  # noqa: F401
    moe,  # noqa: F401
    skip,  # noqa: F401
    subnet,  # noqa: F401
    widen,  # noqa: F401
)

from onnxmorph.contract.registry import REGISTRY

__all__ = ["REGISTRY"]
