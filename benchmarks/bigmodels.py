"""Builders of the large benchmark models (VGG16- and ResNet-50-sized, random He-scaled weights)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 13

# The middle layer each benchmark morphs: a 3x3 conv whose output feeds a plain conv chain.
MIDDLE_LAYER = {"vgg16": "conv4_2", "resnet50": "layer3_2_conv2"}


class _Builder:
    """Collects nodes and initializers; weights come from one seeded generator, in float32."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def normal(self, shape: Sequence[int], std: float) -> np.ndarray:
        # float32 directly: a float64 draw of VGG16's 138M weights would need 1.1 GB more.
        out = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        out *= np.float32(std)
        return out

    def node(self, op: str, name: str, inputs: Sequence[str], **attrs: object) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def conv(self, name: str, x: str, cin: int, cout: int, k: int, stride: int = 1, bias: bool = True) -> str:
        w = self.const(f"{name}.weight", self.normal((cout, cin, k, k), math.sqrt(2.0 / (cin * k * k))))
        inputs = [x, w]
        if bias:
            inputs.append(self.const(f"{name}.bias", self.normal((cout,), 0.01)))
        return self.node("Conv", name, inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)

    def bn(self, name: str, x: str, ch: int) -> str:
        scale = self.const(f"{name}.scale", self.rng.uniform(0.8, 1.2, ch))
        shift = self.const(f"{name}.bias", self.normal((ch,), 0.05))
        mean = self.const(f"{name}.mean", self.normal((ch,), 0.05))
        var = self.const(f"{name}.var", self.rng.uniform(0.8, 1.2, ch))
        return self.node("BatchNormalization", name, [x, scale, shift, mean, var], epsilon=1e-5)

    def gemm(self, name: str, x: str, fin: int, fout: int, gain: float = 2.0) -> str:
        w = self.const(f"{name}.weight", self.normal((fout, fin), math.sqrt(gain / fin)))
        b = self.const(f"{name}.bias", self.normal((fout,), 0.01))
        return self.node("Gemm", name, [x, w, b], transB=1)

    def model(self, name: str, image: int, output: str, classes: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image, image])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])],
            initializer=self.initializers,
        )
        model = helper.make_model(graph, producer_name="onnxmorph-benchmarks",
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model


def _w(base: int, scale: float) -> int:
    return max(1, int(round(base * scale)))


def build_vgg16(scale: float = 1.0, image: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """VGG16 (configuration D): 13 3x3 convs with ReLU, 5 max-pools, 3 FC; 138M parameters at scale 1."""
    b = _Builder(seed)
    x, cin = "input", 3
    for block, (base, reps) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), start=1):
        for i in range(1, reps + 1):
            cout = _w(base, scale)
            x = b.node("Relu", f"relu{block}_{i}", [b.conv(f"conv{block}_{i}", x, cin, cout, 3)])
            cin = cout
        x = b.node("MaxPool", f"pool{block}", [x], kernel_shape=[2, 2], strides=[2, 2])
    side = image // 32
    x = b.node("Flatten", "flatten", [x], axis=1)
    fc = _w(4096, scale)
    x = b.node("Relu", "relu6", [b.gemm("fc6", x, cin * side * side, fc)])
    x = b.node("Relu", "relu7", [b.gemm("fc7", x, fc, fc)])
    out = b.gemm("fc8", x, fc, classes, gain=1.0)
    return b.model("vgg16", image, out, classes)


def build_resnet50(scale: float = 1.0, image: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 (bottleneck blocks 3-4-6-3, BatchNorm, projection shortcuts); 25.6M parameters at scale 1."""
    b = _Builder(seed)
    stem = _w(64, scale)
    x = b.conv("conv1", "input", 3, stem, 7, stride=2, bias=False)
    x = b.node("Relu", "conv1_relu", [b.bn("conv1_bn", x, stem)])
    x = b.node("MaxPool", "pool1", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = stem
    for stage, (base, reps) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        mid, cout = _w(base, scale), _w(4 * base, scale)
        for i in range(reps):
            name = f"layer{stage}_{i}"
            stride = 2 if i == 0 and stage > 1 else 1
            y = b.conv(f"{name}_conv1", x, cin, mid, 1, bias=False)
            y = b.node("Relu", f"{name}_relu1", [b.bn(f"{name}_bn1", y, mid)])
            y = b.conv(f"{name}_conv2", y, mid, mid, 3, stride=stride, bias=False)
            y = b.node("Relu", f"{name}_relu2", [b.bn(f"{name}_bn2", y, mid)])
            y = b.bn(f"{name}_bn3", b.conv(f"{name}_conv3", y, mid, cout, 1, bias=False), cout)
            shortcut = x
            if i == 0:
                shortcut = b.bn(f"{name}_down_bn", b.conv(f"{name}_down", x, cin, cout, 1, stride=stride,
                                                          bias=False), cout)
            x = b.node("Relu", f"{name}_relu", [b.node("Add", f"{name}_add", [y, shortcut])])
            cin = cout
    x = b.node("Flatten", "flatten", [b.node("GlobalAveragePool", "gap", [x])], axis=1)
    out = b.gemm("fc", x, cin, classes, gain=1.0)
    return b.model("resnet50", image, out, classes)


BUILDERS = {"vgg16": build_vgg16, "resnet50": build_resnet50}


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)


def write(name: str, path: Path, scale: float, image: int, external_copy: Path | None = None) -> dict:
    """Build model `name` and write it to `path` (one file); optionally also with external data."""
    model = BUILDERS[name](scale=scale, image=image)
    info = {"parameters": parameter_count(model), "scale": scale, "image": image}
    onnx.save(model, str(path))
    info["file_bytes"] = path.stat().st_size
    if external_copy is not None:
        onnx.save(model, str(external_copy), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external_copy.name + ".data", size_threshold=1024)
        info["external_data_bytes"] = (external_copy.parent / (external_copy.name + ".data")).stat().st_size
    return info


def main(argv: Sequence[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("path", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="channel width multiplier")
    parser.add_argument("--image", type=int, default=224, help="input side in pixels")
    parser.add_argument("--external-copy", type=Path, help="also write a copy with external data here")
    args = parser.parse_args(argv)
    info = write(args.name, args.path, args.scale, args.image, args.external_copy)
    json.dump(info, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
