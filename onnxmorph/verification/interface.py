"""The interface of a child: the parent's inputs and outputs, with their names, types and shapes.

Apart from the verifier so that the pass contract (which checks it after every pass) does not
load onnxruntime's side of verification.
"""

from __future__ import annotations

import onnx

from onnxmorph.io import loading as mio


def _io_signature(info: onnx.ValueInfoProto) -> tuple[str, int, tuple | None]:
    tt = info.type.tensor_type
    shape = tuple(declared_dims(info)) if tt.HasField("shape") else None
    return info.name, tt.elem_type, shape


def interface_problems(parent: onnx.ModelProto, child: onnx.ModelProto) -> list[str]:
    """Differences between the parent's and the child's inputs and outputs."""
    problems = []
    for kind, p_list, c_list in (
        ("input", mio.true_inputs(parent), mio.true_inputs(child)),
        ("output", list(parent.graph.output), list(child.graph.output)),
    ):
        p_sig = [_io_signature(i) for i in p_list]
        c_sig = [_io_signature(i) for i in c_list]
        if [s[0] for s in p_sig] != [s[0] for s in c_sig]:
            problems.append(
                f"the child's {kind}s {[s[0] for s in c_sig]} differ from the parent's {[s[0] for s in p_sig]}"
            )
            continue
        for p, c in zip(p_sig, c_sig):
            if p[1] != c[1]:
                problems.append(
                    f"{kind} '{p[0]}': type {onnx.TensorProto.DataType.Name(c[1])} differs from the "
                    f"parent's {onnx.TensorProto.DataType.Name(p[1])}"
                )
            elif p[2] != c[2]:
                problems.append(
                    f"{kind} '{p[0]}': shape {list(c[2] or [])} differs from the parent's {list(p[2] or [])}"
                )
    return problems


def declared_dims(info: onnx.ValueInfoProto) -> list[int | str | None]:
    """An input's declared dims: sizes, dim names, or None where neither is given."""
    dims: list[int | str | None] = []
    for d in info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims
