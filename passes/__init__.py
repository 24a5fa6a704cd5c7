"""The morph passes, one module per morph type; importing this fills onnxmorph's registry."""

from onnxmorph.passes import deepen  # noqa: F401
from onnxmorph.passes import kernel  # noqa: F401
from onnxmorph.passes import skip  # noqa: F401
from onnxmorph.passes import subnet  # noqa: F401
from onnxmorph.passes import widen  # noqa: F401
from onnxmorph.passinfra import REGISTRY

__all__ = ["REGISTRY"]
