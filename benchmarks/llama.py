"""Llama-style decoder models of any size written tensor by tensor straight to disk (random weights, never in memory).

    python benchmarks/llama.py 7b /tmp/llama7b/model.onnx --dtype float16          # 13.5 GB, external data
    python benchmarks/llama.py 0.5b /tmp/half/model.onnx --one-file                 # 2.07 GB in one file
    python benchmarks/llama.py tiny /tmp/tiny.onnx --dtype bfloat16

The graph is what a TorchScript export of Hugging Face's LlamaForCausalLM holds, written out by
hand: a token embedding (Gather), pre-norm blocks with decomposed RMSNorm computed in float32
(Cast, Pow, ReduceMean, Add, Sqrt, Div, Mul, Cast back, Mul by the weight), multi-head attention
with rotary embeddings (Slice, Neg, Concat on the heads) and a causal mask, a SwiGLU feed-forward
(gate * Sigmoid(gate) * up), a final norm and the LM head. Weights are [in, out] as the exporter
writes them (MatMul). Each weight is drawn from a pool of seeded normal values (a fresh random
window of it per tensor, scaled like Llama's initialisation) and written at once: building the
7B model holds a few MB, whatever its size. A one-file model is framed by hand (the protobuf
fields, each weight's bytes copied from a scratch data file), as large as protobuf allows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ALIGN = 65536
OPSET = 17


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    positions: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        per_layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden


PRESETS = {
    "tiny": LlamaShape(hidden=64, layers=2, heads=4, intermediate=160, vocab=256),
    "small": LlamaShape(hidden=256, layers=4, heads=4, intermediate=688, vocab=4000),
    "0.5b": LlamaShape(hidden=1280, layers=22, heads=20, intermediate=3456, vocab=32000),
    "1b": LlamaShape(hidden=2048, layers=11, heads=32, intermediate=5632, vocab=32000),  # 0.70B parameters
    "7b": LlamaShape(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000),  # Llama-2-7B's shapes
}

DTYPES = {"float32": 1, "float16": 10, "bfloat16": 16}  # TensorProto element types


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _Writer:
    """Appends tensors to a data file at aligned offsets and records their external-data entries."""

    def __init__(self, data_path: Path, dtype: str, seed: int) -> None:
        import onnx

        self.onnx = onnx
        self.file = open(data_path, "wb")  # noqa: SIM115  (closed by close())
        self.location = data_path.name
        self.dtype_name = dtype
        self.dtype = _numpy_dtype(dtype)
        self.offset = 0
        self.tensors: list[Any] = []
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.pool = rng.standard_normal(2**22 + 7, dtype=np.float32)  # windows of it are each tensor's values

    def _put(self, name: str, array: np.ndarray, data_type: int) -> str:
        self.offset = -(-self.offset // ALIGN) * ALIGN
        self.file.seek(self.offset)
        self.file.write(np.ascontiguousarray(array).tobytes())
        tensor = self.onnx.TensorProto(name=name, data_type=data_type, dims=list(array.shape))
        tensor.data_location = self.onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)),
                           ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.tensors.append(tensor)
        self.offset += array.nbytes
        return name

    def normal(self, name: str, shape: Sequence[int], std: float, mean: float = 0.0) -> str:
        """A weight of `shape`, written in chunks of rows: a random window of the pool, scaled."""
        count = math.prod(shape)
        self.offset = -(-self.offset // ALIGN) * ALIGN
        start = self.offset
        self.file.seek(start)
        done = 0
        chunk = 2**22
        while done < count:
            n = min(chunk, count - done)
            at = int(self.rng.integers(0, self.pool.size - n + 1)) if n < self.pool.size else 0
            values = self.pool[at:at + n] * np.float32(std) + np.float32(mean)
            self.file.write(values.astype(self.dtype).tobytes())
            done += n
        tensor = self.onnx.TensorProto(name=name, data_type=DTYPES[self.dtype_name], dims=list(shape))
        tensor.data_location = self.onnx.TensorProto.EXTERNAL
        nbytes = count * self.dtype.itemsize
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.tensors.append(tensor)
        self.offset = start + nbytes
        return name

    def array(self, name: str, array: np.ndarray) -> str:
        """A small constant in the model's dtype (float) or as it is (integers)."""
        if array.dtype.kind == "f":
            return self._put(name, array.astype(self.dtype), DTYPES[self.dtype_name])
        return self._put(name, array, self.onnx.helper.np_dtype_to_tensor_dtype(array.dtype))

    def close(self) -> None:
        self.file.truncate(self.offset)
        self.file.close()


def build_graph(shape: LlamaShape, w: _Writer) -> Any:
    """The decoder's nodes and initializers (written through `w`); returns the ModelProto header."""
    import onnx
    from onnx import TensorProto, helper

    dtype = DTYPES[w.dtype_name]
    nodes: list[onnx.NodeProto] = []
    small: list[onnx.TensorProto] = []
    counter = iter(range(10**9))

    def node(op: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        out = f"{name}_output_0"
        nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def const(name: str, values: Any, data_type: int = TensorProto.INT64) -> str:
        array = np.asarray(values)
        if data_type == dtype and dtype == DTYPES["bfloat16"]:
            small.append(helper.make_tensor(name, data_type, array.shape, array.astype(np.float32).reshape(-1)))
        else:
            np_type = helper.tensor_dtype_to_np_dtype(data_type)
            small.append(onnx.numpy_helper.from_array(array.astype(np_type), name))
        return name

    h, hd = shape.hidden, shape.head_dim
    half = hd // 2
    one_f = const("const/one", 1.0, TensorProto.FLOAT)
    two_f = const("const/two", 2.0, TensorProto.FLOAT)
    eps = const("const/eps", 1e-5, TensorProto.FLOAT)
    axis_last = const("const/axes_last", [-1])
    zero_1 = const("const/zero", [0])
    heads_shape = const("const/heads_shape", [0, 0, shape.heads, hd])
    merge_shape = const("const/merge_shape", [0, 0, h])
    scale = const("const/scale", 1.0 / math.sqrt(hd), dtype)
    first_half = (const("const/half_start", [0]), const("const/half_end", [half]))
    second_half = (const("const/half2_start", [half]), const("const/half2_end", [hd]))

    def rms_norm(x: str, prefix: str) -> str:
        weight = w.normal(f"{prefix}.weight", (h,), 0.1, 1.0)
        xf = node("Cast", [x], f"/{prefix}/Cast", to=TensorProto.FLOAT) if dtype != TensorProto.FLOAT else x
        p = node("Pow", [xf, two_f], f"/{prefix}/Pow")
        m = node("ReduceMean", [p], f"/{prefix}/ReduceMean", axes=[-1], keepdims=1)
        s = node("Sqrt", [node("Add", [m, eps], f"/{prefix}/Add")], f"/{prefix}/Sqrt")
        r = node("Div", [one_f, s], f"/{prefix}/Div")
        normed = node("Mul", [xf, r], f"/{prefix}/Mul")
        if dtype != TensorProto.FLOAT:
            normed = node("Cast", [normed], f"/{prefix}/Cast_1", to=dtype)
        return node("Mul", [weight, normed], f"/{prefix}/Mul_1")

    def linear(x: str, prefix: str, fan_in: int, fan_out: int) -> str:
        return node("MatMul", [x, w.normal(f"{prefix}.weight", (fan_in, fan_out), 0.02)], f"/{prefix}/MatMul")

    def rotate(x: str, prefix: str) -> str:
        x1 = node("Slice", [x, *first_half, axis_last], f"{prefix}/Slice")
        x2 = node("Slice", [x, *second_half, axis_last], f"{prefix}/Slice_1")
        rotated = node("Concat", [node("Neg", [x2], f"{prefix}/Neg"), x1], f"{prefix}/Concat", axis=-1)
        return node("Add", [node("Mul", [x, cos], f"{prefix}/Mul"),
                            node("Mul", [rotated, sin], f"{prefix}/Mul_1")], f"{prefix}/Add")

    # positions: the rotary tables and the causal mask, sliced to the sequence length
    seq = node("Gather", [node("Shape", ["input_ids"], "/model/Shape"), const("const/one_i", 1)], "/model/Gather")
    seq_1 = node("Unsqueeze", [seq, zero_1], "/model/Unsqueeze")
    inv = 1.0 / (10000 ** (np.arange(0, half, dtype=np.float64) / half))
    angles = np.outer(np.arange(shape.positions), inv)
    angles = np.concatenate([angles, angles], axis=1)
    cos = node("Slice", [w.array("model.rotary.cos", np.cos(angles)), zero_1, seq_1, zero_1], "/model/rotary/Slice")
    sin = node("Slice", [w.array("model.rotary.sin", np.sin(angles)), zero_1, seq_1, zero_1], "/model/rotary/Slice_1")
    causal = np.triu(np.full((shape.positions, shape.positions), -1e4), 1)
    ends = node("Concat", [seq_1, seq_1], "/model/mask/Concat", axis=0)
    mask = node("Slice", [w.array("model.causal_mask", causal), const("const/zero2", [0, 0]), ends],
                "/model/mask/Slice")

    x = node("Gather", [w.normal("model.embed_tokens.weight", (shape.vocab, h), 0.02), "input_ids"],
             "/model/embed_tokens/Gather")
    for i in range(shape.layers):
        p = f"model/layers.{i}"
        y = rms_norm(x, f"{p}/input_layernorm")
        heads = []
        for proj in ("q_proj", "k_proj", "v_proj"):
            z = node("Reshape", [linear(y, f"{p}/self_attn/{proj}", h, h), heads_shape],
                     f"/{p}/self_attn/{proj}/Reshape")
            heads.append(node("Transpose", [z], f"/{p}/self_attn/{proj}/Transpose", perm=[0, 2, 1, 3]))
        q, k = (rotate(t, f"/{p}/self_attn/rotary_{n}") for t, n in zip(heads[:2], "qk"))
        kt = node("Transpose", [k], f"/{p}/self_attn/Transpose_k", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], f"/{p}/self_attn/MatMul"), scale], f"/{p}/self_attn/Mul")
        probs = node("Softmax", [node("Add", [scores, mask], f"/{p}/self_attn/Add")], f"/{p}/self_attn/Softmax",
                     axis=-1)
        a = node("Transpose", [node("MatMul", [probs, heads[2]], f"/{p}/self_attn/MatMul_1")],
                 f"/{p}/self_attn/Transpose", perm=[0, 2, 1, 3])
        a = node("Reshape", [a, merge_shape], f"/{p}/self_attn/Reshape")
        x = node("Add", [x, linear(a, f"{p}/self_attn/o_proj", h, h)], f"/{p}/Add")
        y = rms_norm(x, f"{p}/post_attention_layernorm")
        gate = linear(y, f"{p}/mlp/gate_proj", h, shape.intermediate)
        act = node("Mul", [gate, node("Sigmoid", [gate], f"/{p}/mlp/act_fn/Sigmoid")], f"/{p}/mlp/act_fn/Mul")
        up = linear(y, f"{p}/mlp/up_proj", h, shape.intermediate)
        x = node("Add", [x, linear(node("Mul", [act, up], f"/{p}/mlp/Mul"), f"{p}/mlp/down_proj",
                                    shape.intermediate, h)], f"/{p}/Add_1")
    y = rms_norm(x, "model/norm")
    logits = linear(y, "lm_head", h, shape.vocab)
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
    del counter
    graph = helper.make_graph(
        nodes, "llama", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", dtype, ["batch", "sequence", shape.vocab])],
        initializer=small + w.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxmorph-benchmarks")
    model.ir_version = 8
    return model


def write_llama(path: Path, shape: LlamaShape, *, dtype: str = "float32", one_file: bool = False,
                seed: int = 0) -> dict[str, Any]:
    """Write the model to `path` (with `path`.data beside it, or as one file); returns what it is."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    writer = _Writer(data, dtype, seed)
    try:
        model = build_graph(shape, writer)
    finally:
        writer.close()
    if one_file:
        _write_one_file(model, path, data)
        data.unlink()
    else:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return {"path": str(path), "bytes": size, "dtype": dtype, "one_file": one_file,
            "parameters": shape.parameters(), **asdict(shape)}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload_length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(payload_length)


def _write_one_file(model: Any, path: Path, data: Path) -> None:
    """The model as one protobuf file: its fields, then the graph's with each weight's bytes copied in."""
    import onnx

    weights = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    graph.initializer.extend(inline)
    pieces: list[tuple[bytes, int, int]] = []  # (tensor description, offset, length) of each weight
    for t in weights:
        info = {e.key: e.value for e in t.external_data}
        stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
        length = int(info["length"])
        pieces.append((stub.SerializeToString() + _field(9, length), int(info["offset"]), length))
    body = graph.SerializeToString()
    tensors = [_field(5, len(desc) + length) + desc for desc, _, length in pieces]
    graph_length = len(body) + sum(len(t) + p[2] for t, p in zip(tensors, pieces))
    outer = onnx.ModelProto()
    outer.CopyFrom(model)
    outer.ClearField("graph")
    with open(path, "wb") as out, open(data, "rb") as src:
        out.write(outer.SerializeToString() + _field(7, graph_length) + body)
        for head, (_, offset, length) in zip(tensors, pieces):
            out.write(head)
            out.flush()
            copied = 0
            while copied < length:
                copied += os.copy_file_range(src.fileno(), out.fileno(), length - copied, offset + copied)
            out.seek(0, os.SEEK_END)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", choices=sorted(PRESETS))
    parser.add_argument("path", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--one-file", action="store_true", help="weights inside the model file (under 2 GiB)")
    parser.add_argument("--layers", type=int, help="override the preset's number of blocks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = PRESETS[args.size]
    if args.layers:
        shape = LlamaShape(**{**asdict(shape), "layers": args.layers})
    args.path.parent.mkdir(parents=True, exist_ok=True)
    json.dump(write_llama(args.path, shape, dtype=args.dtype, one_file=args.one_file, seed=args.seed), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
