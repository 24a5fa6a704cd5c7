"""Builds the small, deterministic reference ONNX models that onnxmorph's tests and docs morph."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRODUCER = "onnxmorph-models"
# IR 8 covers every opset used here (13 and 17) and loads in older runtimes.
IR_VERSION = 8
BATCH = "N"
IMAGE = (3, 32, 32)


class _GraphBuilder:
    """Accumulates nodes and initializers, tracking channel counts so layers need no bookkeeping.

    Random parameters are drawn in call order from one generator, which is what makes a builder
    deterministic for a given seed.
    """

    def __init__(self, seed: int, width_multiplier: float) -> None:
        self.rng = np.random.default_rng(seed)
        self.width_multiplier = width_multiplier
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.channels: dict[str, int] = {}

    def width(self, base: int) -> int:
        return max(1, int(round(base * self.width_multiplier)))

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def normal(self, shape: Sequence[int], std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def node(self, op: str, name: str, inputs: Sequence[str], output: str | None = None,
             **attrs: object) -> str:
        # Output names always differ from node names: users may refer to a layer by either.
        out = output or f"{name}_out"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        if inputs and inputs[0] in self.channels:
            self.channels[out] = self.channels[inputs[0]]
        return out

    def conv(self, name: str, x: str, out_ch: int, kernel: int, stride: int = 1,
             group: int = 1) -> str:
        in_ch = self.channels[x]
        fan_in = in_ch // group * kernel * kernel
        # He initialisation keeps ReLU activations at unit scale through the depth of the net.
        w = self.const(f"{name}.weight",
                       self.normal((out_ch, in_ch // group, kernel, kernel),
                                   math.sqrt(2.0 / fan_in)))
        b = self.const(f"{name}.bias", self.normal((out_ch,), 0.05))
        pad = kernel // 2
        out = self.node("Conv", name, [x, w, b], kernel_shape=[kernel, kernel],
                        strides=[stride, stride], pads=[pad] * 4, group=group)
        self.channels[out] = out_ch
        return out

    def bn(self, name: str, x: str) -> str:
        ch = self.channels[x]
        # Non-trivial statistics (var != 1, mean != 0) so a morph that ignores BN is caught.
        scale = self.const(f"{name}.scale", self.rng.uniform(0.6, 1.4, ch))
        bias = self.const(f"{name}.bias", self.normal((ch,), 0.1))
        mean = self.const(f"{name}.mean", self.normal((ch,), 0.1))
        var = self.const(f"{name}.var", self.rng.uniform(0.5, 2.0, ch))
        return self.node("BatchNormalization", name, [x, scale, bias, mean, var], epsilon=1e-5)

    def relu(self, name: str, x: str) -> str:
        return self.node("Relu", name, [x])

    def relu6(self, name: str, x: str) -> str:
        # Opset 13 Clip takes its bounds as inputs; one shared pair of constants, as exporters emit.
        if not any(t.name == "relu6.min" for t in self.initializers):
            self.const("relu6.min", np.array(0.0))
            self.const("relu6.max", np.array(6.0))
        return self.node("Clip", name, [x, "relu6.min", "relu6.max"])

    def conv_bn(self, name: str, x: str, out_ch: int, kernel: int, stride: int = 1,
                group: int = 1, act: str | None = "relu") -> str:
        y = self.bn(f"{name}_bn", self.conv(name, x, out_ch, kernel, stride, group))
        if act == "relu":
            return self.relu(f"{name}_relu", y)
        if act == "relu6":
            return self.relu6(f"{name}_relu6", y)
        return y

    def pool(self, op: str, name: str, x: str, kernel: int, stride: int, pad: int = 0,
             ceil_mode: int = 0) -> str:
        attrs: dict[str, object] = {"kernel_shape": [kernel, kernel], "strides": [stride, stride],
                                    "pads": [pad] * 4, "ceil_mode": ceil_mode}
        if op == "AveragePool":
            # Caffe divides by the in-bounds window size at ceil-mode edges.
            attrs["count_include_pad"] = 0
        return self.node(op, name, [x], **attrs)

    def gemm(self, name: str, x: str, in_features: int, out_features: int,
             output: str | None = None, gain: float = 2.0) -> str:
        # PyTorch layout ([out, in] with transB=1), so the weight reads like an exported Linear.
        w = self.const(f"{name}.weight",
                       self.normal((out_features, in_features), math.sqrt(gain / in_features)))
        b = self.const(f"{name}.bias", self.normal((out_features,), 0.05))
        return self.node("Gemm", name, [x, w, b], output, transB=1)

    def matmul_add(self, name: str, x: str, in_features: int, out_features: int,
                   output: str | None = None, gain: float = 2.0) -> str:
        w = self.const(f"{name}.weight",
                       self.normal((in_features, out_features), math.sqrt(gain / in_features)))
        b = self.const(f"{name}.bias", self.normal((out_features,), 0.05))
        y = self.node("MatMul", name, [x, w])
        return self.node("Add", f"{name}_add", [y, b], output)

    def classifier_head(self, x: str, classes: int = 10) -> str:
        pooled = self.node("GlobalAveragePool", "gap", [x])
        flat = self.node("Flatten", "flatten", [pooled], axis=1)
        return self.gemm("fc", flat, self.channels[x], classes, output="logits", gain=1.0)

    def model(self, name: str, doc: str, inputs: Sequence[onnx.ValueInfoProto],
              outputs: Sequence[onnx.ValueInfoProto], opset: int = 13) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs),
                                  initializer=self.initializers)
        model = helper.make_model(graph, producer_name=PRODUCER, doc_string=doc,
                                  opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = IR_VERSION
        return model


def _tensor(name: str, *dims: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH, *dims])


def _image_input(b: _GraphBuilder) -> onnx.ValueInfoProto:
    b.channels["input"] = IMAGE[0]
    return _tensor("input", *IMAGE)


def _mlp(activation: str, use_gemm: bool, width_multiplier: float, seed: int,
         name: str, doc: str) -> onnx.ModelProto:
    b = _GraphBuilder(seed, width_multiplier)
    sizes = [784, b.width(128), b.width(64), 10]
    x = "input"
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        last = i == len(sizes) - 1
        # Tanh is not rectifying, so it wants Glorot-like gain 1 rather than He's 2.
        gain = 1.0 if last or activation == "Tanh" else 2.0
        layer = b.gemm if use_gemm else b.matmul_add
        x = layer(f"fc{i}", x, fan_in, fan_out, output="logits" if last else None, gain=gain)
        if not last:
            x = b.node(activation, f"{activation.lower()}{i}", [x])
    return b.model(name, doc, [_tensor("input", 784)], [_tensor("logits", 10)])


def build_mlp_relu(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """784-128-64-10 perceptron with Gemm layers and ReLU."""
    return _mlp("Relu", True, width_multiplier, seed, "mlp_relu",
                "MLP 784-128-64-10, Gemm + Relu; onnxmorph reference model.")


def build_mlp_tanh(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """784-128-64-10 perceptron with MatMul + Add layers and Tanh."""
    return _mlp("Tanh", False, width_multiplier, seed, "mlp_tanh",
                "MLP 784-128-64-10, MatMul + Add + Tanh; onnxmorph reference model.")


def build_cifar10_quick(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """Caffe's cifar10_quick, the baseline of the network morphism paper (Wei et al., 2016)."""
    b = _GraphBuilder(seed, width_multiplier)
    x = _image_input(b)
    # Caffe's order differs per block (pool before ReLU in block 1), kept as in the prototxt.
    y = b.conv("conv1", "input", b.width(32), 5)
    y = b.relu("relu1", b.pool("MaxPool", "pool1", y, 3, 2, ceil_mode=1))
    y = b.relu("relu2", b.conv("conv2", y, b.width(32), 5))
    y = b.pool("AveragePool", "pool2", y, 3, 2, ceil_mode=1)
    y = b.relu("relu3", b.conv("conv3", y, b.width(64), 5))
    y = b.pool("AveragePool", "pool3", y, 3, 2, ceil_mode=1)
    flat_features = b.channels[y] * 4 * 4
    y = b.node("Flatten", "flatten", [y], axis=1)
    # As in Caffe, no nonlinearity between ip1 and ip2.
    y = b.gemm("fc1", y, flat_features, b.width(64), gain=1.0)
    y = b.gemm("fc2", y, b.width(64), 10, output="logits", gain=1.0)
    return b.model("cifar10_quick", "Caffe cifar10_quick (ceil-mode pools, 32-16-8-4); "
                   "onnxmorph reference model.", [x], [_tensor("logits", 10)])


def build_vgg_bn(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """Three VGG blocks of (Conv-BN-ReLU) x2 + MaxPool, then a two-layer classifier."""
    b = _GraphBuilder(seed, width_multiplier)
    x = _image_input(b)
    y = "input"
    for block, base in enumerate((16, 32, 64), start=1):
        for i in (1, 2):
            y = b.conv_bn(f"conv{block}_{i}", y, b.width(base), 3)
        y = b.pool("MaxPool", f"pool{block}", y, 2, 2)
    flat_features = b.channels[y] * 4 * 4
    y = b.node("Flatten", "flatten", [y], axis=1)
    y = b.relu("fc1_relu", b.gemm("fc1", y, flat_features, b.width(128)))
    y = b.node("Dropout", "dropout", [y])
    y = b.gemm("fc2", y, b.width(128), 10, output="logits", gain=1.0)
    return b.model("vgg_bn", "VGG-style 3x(conv-bn-relu x2, maxpool) + 2 FC; "
                   "onnxmorph reference model.", [x], [_tensor("logits", 10)])


def _basic_block(b: _GraphBuilder, name: str, x: str, out_ch: int, stride: int) -> str:
    y = b.conv_bn(f"{name}_conv1", x, out_ch, 3, stride)
    y = b.conv_bn(f"{name}_conv2", y, out_ch, 3, act=None)
    shortcut = x
    if stride != 1 or b.channels[x] != out_ch:
        shortcut = b.conv_bn(f"{name}_proj", x, out_ch, 1, stride, act=None)
    y = b.node("Add", f"{name}_add", [y, shortcut])
    return b.relu(f"{name}_relu", y)


def build_resnet_mini(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """Two-stage ResNet with basic blocks and one strided projection shortcut."""
    b = _GraphBuilder(seed, width_multiplier)
    x = _image_input(b)
    y = b.conv_bn("stem_conv", "input", b.width(16), 3)
    y = _basic_block(b, "s1b1", y, b.width(16), 1)
    y = _basic_block(b, "s1b2", y, b.width(16), 1)
    y = _basic_block(b, "s2b1", y, b.width(32), 2)
    y = _basic_block(b, "s2b2", y, b.width(32), 1)
    logits = b.classifier_head(y)
    return b.model("resnet_mini", "ResNet-style: stem + 2 stages x 2 basic blocks, projection "
                   "shortcut in s2b1; onnxmorph reference model.", [x], [_tensor(logits, 10)])


def _inception(b: _GraphBuilder, name: str, x: str, c1: int, c3r: int, c3: int, c5r: int,
               c5: int, cp: int) -> str:
    """GoogLeNet module; channel arguments follow the paper's table columns."""
    w = b.width
    y1 = b.relu(f"{name}_1x1_relu", b.conv(f"{name}_1x1", x, w(c1), 1))
    y3 = b.relu(f"{name}_3x3_reduce_relu", b.conv(f"{name}_3x3_reduce", x, w(c3r), 1))
    y3 = b.relu(f"{name}_3x3_relu", b.conv(f"{name}_3x3", y3, w(c3), 3))
    y5 = b.relu(f"{name}_5x5_reduce_relu", b.conv(f"{name}_5x5_reduce", x, w(c5r), 1))
    y5 = b.relu(f"{name}_5x5_relu", b.conv(f"{name}_5x5", y5, w(c5), 5))
    yp = b.pool("MaxPool", f"{name}_pool", x, 3, 1, pad=1)
    yp = b.relu(f"{name}_pool_proj_relu", b.conv(f"{name}_pool_proj", yp, w(cp), 1))
    out = b.node("Concat", f"{name}_concat", [y1, y3, y5, yp], axis=1)
    b.channels[out] = w(c1) + w(c3) + w(c5) + w(cp)
    return out


def build_inception_mini(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """Stem + LRN + two Inception modules, with a 1x1 conv mixing the first module's Concat."""
    b = _GraphBuilder(seed, width_multiplier)
    x = _image_input(b)
    y = b.relu("stem_relu", b.conv("stem_conv", "input", b.width(32), 3, stride=2))
    y = b.node("LRN", "stem_lrn", [y], size=5, alpha=1e-4, beta=0.75, bias=1.0)
    y = _inception(b, "inc1", y, 16, 16, 24, 4, 8, 8)
    y = b.relu("mix1_relu", b.conv("mix1", y, b.width(32), 1))
    y = b.pool("MaxPool", "pool1", y, 3, 2, pad=1)
    y = _inception(b, "inc2", y, 8, 8, 12, 4, 4, 4)
    logits = b.classifier_head(y)
    return b.model("inception_mini", "GoogLeNet-style: stem, LRN, two Inception modules; "
                   "onnxmorph reference model.", [x], [_tensor(logits, 10)])


def build_mobilenet_mini(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """MobileNet v1 style: ReLU6 (Clip), depthwise-separable blocks, one strided."""
    b = _GraphBuilder(seed, width_multiplier)
    x = _image_input(b)
    y = b.conv_bn("stem_conv", "input", b.width(16), 3, stride=2, act="relu6")
    for i, (base, stride) in enumerate(((32, 1), (64, 2), (64, 1)), start=1):
        ch = b.channels[y]
        y = b.conv_bn(f"dw{i}", y, ch, 3, stride, group=ch, act="relu6")
        y = b.conv_bn(f"pw{i}", y, b.width(base), 1, act="relu6")
    logits = b.classifier_head(y)
    return b.model("mobilenet_mini", "MobileNet-style: ReLU6 stem + 3 depthwise-separable "
                   "blocks; onnxmorph reference model.", [x], [_tensor(logits, 10)])


def build_transformer_ff(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """Transformer feed-forward sublayer: ff1, Erf GELU, ff2, residual Add, LayerNorm.

    Only the hidden width scales: the model dimension is tied to the input by the residual.
    """
    b = _GraphBuilder(seed, width_multiplier)
    seq, d_model, d_ff = 8, 32, b.width(128)
    h = b.matmul_add("ff1", "input", d_model, d_ff)
    # GELU spelled out as torch.onnx exports it before opset 20.
    g = b.node("Div", "gelu_div", [h, b.const("gelu.sqrt2", np.array(math.sqrt(2.0)))])
    g = b.node("Erf", "gelu_erf", [g])
    g = b.node("Add", "gelu_add", [g, b.const("gelu.one", np.array(1.0))])
    g = b.node("Mul", "gelu_mul", [h, g])
    g = b.node("Mul", "gelu_half", [g, b.const("gelu.half", np.array(0.5))])
    y = b.matmul_add("ff2", g, d_ff, d_model, gain=1.0)
    y = b.node("Add", "residual_add", ["input", y])
    scale = b.const("layernorm.scale", b.rng.uniform(0.6, 1.4, d_model))
    bias = b.const("layernorm.bias", b.normal((d_model,), 0.1))
    b.node("LayerNormalization", "layernorm", [y, scale, bias], "output", axis=-1,
           epsilon=1e-5)
    return b.model("transformer_ff", "Transformer FF block 32-128-32 with Erf GELU, residual "
                   "and LayerNorm; onnxmorph reference model.",
                   [_tensor("input", seq, d_model)], [_tensor("output", seq, d_model)], opset=17)


def build_transformer_prenorm(width_multiplier: float = 1, seed: int = 0) -> onnx.ModelProto:
    """Two pre-norm residual feed-forward blocks (x + FF(LayerNorm(x))) and a final LayerNorm.

    The stream every block reads and writes is what `block` grows: a new block after either one
    starts as the identity.
    """
    b = _GraphBuilder(seed, width_multiplier)
    seq, d_model, d_ff = 8, 16, b.width(32)
    x = "input"
    for k in range(2):
        scale = b.const(f"b{k}.norm.scale", b.rng.uniform(0.6, 1.4, d_model))
        bias = b.const(f"b{k}.norm.bias", b.normal((d_model,), 0.1))
        h = b.node("LayerNormalization", f"b{k}_norm", [x, scale, bias], axis=-1, epsilon=1e-5)
        h = b.matmul_add(f"b{k}_ff1", h, d_model, d_ff)
        h = b.node("Relu", f"b{k}_relu", [h])
        h = b.matmul_add(f"b{k}_ff2", h, d_ff, d_model, gain=1.0)
        x = b.node("Add", f"b{k}_residual", [x, h])
    scale = b.const("final_norm.scale", b.rng.uniform(0.6, 1.4, d_model))
    bias = b.const("final_norm.bias", b.normal((d_model,), 0.1))
    b.node("LayerNormalization", "final_norm", [x, scale, bias], "output", axis=-1, epsilon=1e-5)
    return b.model("transformer_prenorm", "Two pre-norm residual feed-forward blocks 16-32-16 and a final "
                   "LayerNorm; onnxmorph reference model.",
                   [_tensor("input", seq, d_model)], [_tensor("output", seq, d_model)], opset=17)


MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "mlp_relu": build_mlp_relu,
    "mlp_tanh": build_mlp_tanh,
    "cifar10_quick": build_cifar10_quick,
    "vgg_bn": build_vgg_bn,
    "resnet_mini": build_resnet_mini,
    "inception_mini": build_inception_mini,
    "mobilenet_mini": build_mobilenet_mini,
    "transformer_ff": build_transformer_ff,
    "transformer_prenorm": build_transformer_prenorm,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory to write the .onnx files into (default: models/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stem, builder in MODELS.items():
        model = builder()
        onnx.checker.check_model(model, full_check=True)
        path = args.out / f"{stem}.onnx"
        # Raw serialisation, so the file is byte-identical to builder().SerializeToString().
        path.write_bytes(model.SerializeToString())
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
