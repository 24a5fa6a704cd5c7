"""onnxruntime sessions for verification: by path, from weights mapped from their files, or as a float32 copy.

A model whose weights stay in files (a lazily read parent, a streaming child, a region of either)
is handed to onnxruntime as its header with each such weight declared external, and the weight
itself as an array mapped from its file (`add_external_initializers`): nothing is copied or
written, and onnxruntime reads the pages it uses. A model of 16-bit floats that onnxruntime has
no CPU kernels for (bfloat16 throughout; some float16 ops) runs as a float32 copy: its
declarations widened (`onnxmorph.io.casting`) and each weight widened into memory as it is
handed over, so such a session holds the model in float32 (twice its bytes).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxmorph.errors import one_line
from onnxmorph.io import casting, saving, streaming
from onnxmorph.io import loading as mio
from onnxmorph.io.proto import declared_bytes, shell
from onnxmorph.numerics.dtypes import is_float

# Where a weight handed over as an array is said to be (onnxruntime never opens it).
IN_MEMORY = "onnxmorph-in-memory"
# Main-graph weights of a float32 copy of at least this many bytes are handed over as arrays.
_DETACH_MIN_BYTES = 1024


class RuntimeProblem(Exception):
    """onnxruntime could not load or run a model (its message in one line)."""


def missing_kernel(exc: BaseException) -> bool:
    """Whether onnxruntime refused a model for want of a kernel for one of its types (NOT_IMPLEMENTED)."""
    text = str(exc)
    return "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text


class Session:
    """An onnxruntime CPU session with graph optimisations off (they could hide a difference).

    `model` is serialised bytes, a path (read by onnxruntime, external data beside it), or a
    ModelProto (its weights in files are mapped, see the module's docstring). With `float32`,
    the session runs a float32 copy of the model and takes and gives float32 where the model
    has 16-bit floats.
    """

    def __init__(self, model: onnx.ModelProto | bytes | str | Path, role: str, *, float32: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4  # its errors come back as exceptions, reported in one line
        self.float32 = float32
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._arrays: list[np.ndarray] = []  # kept alive as long as the session reads them
        try:
            source: Any = model
            if float32 or (isinstance(model, onnx.ModelProto) and streaming.streams(model)):
                proto = _as_proto(model)
                header, names, arrays = detach(proto, float32=float32)
                foreign = next((a.dtype.name for a in arrays if a.dtype.kind == "V"), None)
                if foreign:  # ml_dtypes' types: onnxruntime makes no tensor of them from numpy
                    raise RuntimeProblem(f"NOT_IMPLEMENTED: onnxruntime takes no {foreign} array from numpy")
                if names:
                    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
                    options.add_external_initializers(names, values)
                    # the mapped weights stay file pages that the kernel can drop and share, unless
                    # onnxruntime prepacks them for its kernels (a private copy of the model)
                    options.add_session_config_entry("session.disable_prepacking", "1")
                self._arrays = arrays
                source = header.SerializeToString()
            elif isinstance(model, onnx.ModelProto):
                if mio.approx_size(model) < saving.EXTERNAL_DATA_THRESHOLD:
                    source = model.SerializeToString()
                else:
                    self._tmp = tempfile.TemporaryDirectory(prefix="onnxmorph-verify-")
                    target = Path(self._tmp.name) / f"{role}.onnx"
                    mio.write_with_external_data(model, target)
                    source = str(target)
                    options.add_session_config_entry("session.disable_prepacking", "1")
            elif isinstance(model, (str, Path)):
                source = str(model)
                if mio.external_data_files(model):
                    options.add_session_config_entry("session.disable_prepacking", "1")
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            self.close()
            raise RuntimeProblem(f"onnxruntime cannot load the {role}: {one_line(exc)}") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray], role: str) -> list[np.ndarray]:
        if self.float32:
            feed = {k: v.astype(np.float32) if is_float(v.dtype) and v.dtype.itemsize < 4 else v
                    for k, v in feed.items()}
        try:
            return self.session.run(None, dict(feed))
        except Exception as exc:
            raise RuntimeProblem(f"onnxruntime cannot run the {role}: {one_line(exc)}") from exc

    def close(self) -> None:
        self.__dict__.pop("session", None)
        self._arrays = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _as_proto(model: onnx.ModelProto | bytes | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_model_from_string(model)
    return mio.references(model)  # checked for safety; its weights stay in their files


def detach(model: onnx.ModelProto, *, float32: bool = False) -> tuple[onnx.ModelProto, list[str], list[np.ndarray]]:
    """(header, names, arrays): `model` with its weights kept in files declared external, and those weights.

    Each array is mapped from its file, or with `float32` (16-bit ones) widened into memory;
    with `float32` the header declares float32 wherever the model declared a 16-bit float.
    """
    header = shell(model)
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for tensor in model.graph.initializer:
        half = float32 and tensor.data_type in casting.HALF_FLOATS
        big = half and (declared_bytes(tensor) or 0) >= _DETACH_MIN_BYTES
        if not streaming.is_reference(tensor) and not big:
            header.graph.initializer.append(tensor)
            continue
        array = streaming.map_array(tensor) if streaming.is_reference(tensor) else onnx.numpy_helper.to_array(tensor)
        if half:
            array = _widened(array)
        stub = header.graph.initializer.add(name=tensor.name, dims=tensor.dims,
                                            data_type=onnx.TensorProto.FLOAT if half else tensor.data_type)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value=IN_MEMORY)
        names.append(tensor.name)
        arrays.append(array)
    if float32:
        casting.declare_float32(header)
    return header, names, arrays


def _widened(array: np.ndarray) -> np.ndarray:
    """`array` as float32, converted a slab at a time (a mapped source's pages are released as it goes)."""
    out = np.empty(array.shape, dtype=np.float32)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    step = 2**22
    for k in range(0, flat_in.size, step):
        flat_out[k:k + step] = flat_in[k:k + step]
        if isinstance(array, np.memmap) and (k // step) % 16 == 15:
            streaming.unmap_all()
    streaming.unmap_all()
    return out
