"""Small PyTorch models with the patterns of well-known CNNs (no torchvision), exported to ONNX, and a widen sweep.

Each builder returns a tiny eval-mode module whose graph has what the real architecture's export
has: ResNet's residual stages, MobileNet v2/v3's inverted residuals (ReLU6, hardswish, squeeze-and-
excitation), EfficientNet's MBConv (SiLU, SE), RegNet's grouped convs, ConvNeXt's channels-last
LayerNorm and layer scale, ShuffleNet v2's split and channel shuffle, DenseNet's concatenations,
GoogLeNet's inception modules and SqueezeNet's fire modules.
"""

from __future__ import annotations

import io
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import onnx
import torch  # the test modules importorskip torch before importing this one
from torch import nn

import onnxmorph
from onnxmorph.errors import NotApplicable
from onnxmorph.graph import core as mgraph
from onnxmorph.verification.verifier import Verifier

F = nn.functional


def _bn_act(c: int, act: type[nn.Module] | None = nn.ReLU) -> list[nn.Module]:
    return [nn.BatchNorm2d(c)] + ([act()] if act else [])


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU
            ) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), *_bn_act(cout, act))


class Classifier(nn.Module):
    """Global average pooling (written as `mean`, as torchvision's newer models do) and a Linear head."""

    def __init__(self, features: nn.Module, c: int, classes: int = 5, pool: str = "mean") -> None:
        super().__init__()
        self.features, self.pool, self.fc = features, pool, nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.mean((2, 3)) if self.pool == "mean" else torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1, act=None))
        self.down = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + (self.down(x) if self.down is not None else x))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int, act: type[nn.Module] = nn.ReLU,
                 gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act, self.gate = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1), act(), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """MobileNet v2 (ReLU6), v3 (hardswish, SE with hardsigmoid) and EfficientNet's MBConv (SiLU, SE)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, act: type[nn.Module],
                 se: str | None = None) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = [conv_bn(cin, mid, 1, act=act), conv_bn(mid, mid, 3, stride, groups=mid, act=act)]
        if se == "v3":
            layers.append(SqueezeExcite(mid, max(mid // 4, 8), nn.ReLU, nn.Hardsigmoid))
        elif se == "efficientnet":
            layers.append(SqueezeExcite(mid, max(cin // 4, 4), nn.SiLU, nn.Sigmoid))
        layers.append(conv_bn(mid, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class RegNetBlock(nn.Module):
    """RegNet-X: 1x1, grouped 3x3 (group width 8), 1x1, residual."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 1), conv_bn(cout, cout, 3, stride, groups=cout // group_width),
                                  conv_bn(cout, cout, 1, act=None))
        self.down = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + (self.down(x) if self.down is not None else x))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0]), ConvNeXtBlock(dims[0]))
        self.down = nn.Sequential(LayerNorm2d(dims[0]), nn.Conv2d(dims[0], dims[1], 2, 2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1]))
        self.norm, self.fc = nn.LayerNorm(dims[1]), nn.Linear(dims[1], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean((2, 3))))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet v2: split in two, one half through 1x1 / depthwise 3x3 / 1x1, concat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, half, 1))
        self.branch2 = nn.Sequential(conv_bn(cin if stride > 1 else half, half, 1),
                                     conv_bn(half, half, 3, stride, groups=half, act=None), conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 2 * growth, 1, bias=False),
                                  nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3: tuple[int, int], c5: tuple[int, int], cp: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b2 = nn.Sequential(conv_bn(cin, c3[0], 1), conv_bn(c3[0], c3[1], 3))
        self.b3 = nn.Sequential(conv_bn(cin, c5[0], 1), conv_bn(c5[0], c5[1], 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(16, 8, 16), Fire(32, 8, 16), nn.MaxPool2d(3, 2, ceil_mode=True),
                                      Fire(32, 12, 24))
        self.classifier = nn.Sequential(nn.Conv2d(48, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def _resnet() -> nn.Module:
    return Classifier(nn.Sequential(conv_bn(3, 16, 7, 2), nn.MaxPool2d(3, 2, 1), BasicBlock(16, 16),
                                    BasicBlock(16, 32, 2), BasicBlock(32, 32)), 32, pool="adaptive")


def _mobilenet(version: str) -> nn.Module:
    act = nn.ReLU6 if version == "v2" else nn.Hardswish
    se = None if version == "v2" else "v3"
    blocks = [InvertedResidual(16, 16, 3, 1, act, se), InvertedResidual(16, 24, 4, 2, act, se),
              InvertedResidual(24, 24, 3, 1, act, se)]
    return Classifier(nn.Sequential(conv_bn(3, 16, 3, 2, act=act), *blocks, conv_bn(24, 48, 1, act=act)), 48)


def _efficientnet() -> nn.Module:
    blocks = [InvertedResidual(16, 16, 1, 1, nn.SiLU, "efficientnet"),
              InvertedResidual(16, 24, 6, 2, nn.SiLU, "efficientnet"),
              InvertedResidual(24, 24, 6, 1, nn.SiLU, "efficientnet")]
    return Classifier(nn.Sequential(conv_bn(3, 16, 3, 2, act=nn.SiLU), *blocks, conv_bn(24, 64, 1, act=nn.SiLU)),
                      64, pool="adaptive")


def _regnet() -> nn.Module:
    return Classifier(nn.Sequential(conv_bn(3, 16, 3, 2), RegNetBlock(16, 24, 2), RegNetBlock(24, 24, 1),
                                    RegNetBlock(24, 48, 2)), 48)


def _shufflenet() -> nn.Module:
    units = [ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1), ShuffleUnit(32, 32, 1), ShuffleUnit(32, 64, 2),
             ShuffleUnit(64, 64, 1)]
    return Classifier(nn.Sequential(conv_bn(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1), *units, conv_bn(64, 96, 1)), 96)


def _densenet() -> nn.Module:
    return Classifier(nn.Sequential(conv_bn(3, 16, 3, 1), DenseLayer(16, 8), DenseLayer(24, 8),
                                    nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1, bias=False),
                                    nn.AvgPool2d(2, 2), DenseLayer(16, 8), DenseLayer(24, 8),
                                    nn.BatchNorm2d(32), nn.ReLU()), 32, pool="adaptive")


def _googlenet() -> nn.Module:
    return Classifier(nn.Sequential(conv_bn(3, 16, 3, 2), nn.MaxPool2d(3, 2, 1), Inception(16, 8, (8, 12), (4, 6), 6),
                                    Inception(32, 12, (8, 16), (4, 8), 8), nn.MaxPool2d(3, 2, 1),
                                    Inception(44, 16, (12, 16), (4, 8), 8)), 48, pool="adaptive")


class Patterns(nn.Module):
    """One small net with every pattern the rule table added: mean pooling and squeeze-and-excitation, a grouped
    conv, a channel shuffle after a split, a per-channel scale read twice, and a class token."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.mb = InvertedResidual(16, 16, 2, 1, nn.Hardswish, "v3")
        self.reg = RegNetBlock(16, 16, 1)
        self.shuffle = ShuffleUnit(16, 16, 1)
        self.a, self.b = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 16)), nn.Parameter(torch.randn(1, 65, 16) * 0.1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shuffle(self.reg(self.mb(self.stem(x))))
        x = x + self.scale * self.a(x) + self.scale * self.b(x)
        t = x.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.fc(t.mean(1))


ARCHITECTURES = {
    "resnet": _resnet, "mobilenet_v2": lambda: _mobilenet("v2"), "mobilenet_v3": lambda: _mobilenet("v3"),
    "efficientnet": _efficientnet, "regnet": _regnet, "convnext": ConvNeXt, "shufflenet_v2": _shufflenet,
    "densenet": _densenet, "googlenet": _googlenet, "squeezenet": SqueezeNet,
}


def _randomize_bn(module: nn.Module, seed: int) -> None:
    """Non-trivial batch-norm statistics, so that a wrong per-channel constant shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def export(module: nn.Module, *, dynamo: bool = True, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """`module` (eval mode) exported by torch.onnx.export with the given exporter, normalised for morphing."""
    torch.manual_seed(seed)
    _randomize_bn(module, seed)
    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module, (torch.randn(2, 3, size, size),), dynamo=True, verbose=False)
            model = program.model_proto
        else:
            torch.onnx.export(module, (torch.randn(2, 3, size, size),), buffer, dynamo=False)
            model = onnx.load_from_string(buffer.getvalue())
    return onnxmorph.normalize(model)


def build(name: str, *, dynamo: bool = True) -> onnx.ModelProto:
    torch.manual_seed(0)
    return export(ARCHITECTURES[name](), dynamo=dynamo)


@dataclass
class Sweep:
    """What widening every layer by 50% gave: verified, refused (with reasons), excluded, wrong, crashed."""

    verified: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)  # channels reach a graph output: necessarily refused
    wrong: dict[str, str] = field(default_factory=dict)
    crashed: dict[str, str] = field(default_factory=dict)

    @property
    def counted(self) -> int:
        return len(self.verified) + len(self.refused) + len(self.wrong) + len(self.crashed)

    def reasons(self) -> Counter:
        """The refusals counted by kind (names left out)."""
        return Counter(re.sub(r"'[^']*'", "'...'", reason) for reason in self.refused.values())


def sweep(model: onnx.ModelProto, layers: list[str] | None = None) -> Sweep:
    """Widen each Conv/Gemm/MatMul layer (or those named) by 50% and verify each child against the parent."""
    widen = onnxmorph.get_pass("widen")
    result = Sweep()
    verifier = Verifier(model, trials=1)
    for info in mgraph.layers(mgraph.read_view(model)):
        if layers is not None and info.name not in layers:
            continue
        try:
            probe = widen.probe(model, info)
            probe.requires(model)
            child = probe.apply(model).model
        except NotApplicable as exc:
            target = result.excluded if "graph output" in str(exc) else None
            if target is not None:
                target.append(info.name)
            else:
                result.refused[info.name] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001  (a crash is what the sweep counts)
            result.crashed[info.name] = f"{type(exc).__name__}: {exc}"
            continue
        report = verifier.check(child)
        (result.verified.append(info.name) if report else result.wrong.__setitem__(info.name, report.summary()))
    return result
