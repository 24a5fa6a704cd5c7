"""widen on graphs written by torch.onnx.export (the default dynamo exporter and dynamo=False) from small models
with the patterns of ResNet, MobileNet v2/v3, EfficientNet, RegNet, ConvNeXt, ShuffleNet v2, DenseNet, GoogLeNet
and SqueezeNet (tests/cnn_zoo.py): every child verifies, or the refusal is one line naming the op in the way."""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")

import cnn_zoo  # noqa: E402  (needs torch)

import onnxmorph  # noqa: E402

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]


def _exporter(dynamo: bool) -> None:
    if dynamo:
        pytest.importorskip("onnxscript")  # torch.onnx.export's default exporter imports it


@functools.cache
def _patterns(dynamo: bool):
    torch.manual_seed(0)
    return cnn_zoo.export(cnn_zoo.Patterns(), dynamo=dynamo, size=16)


@functools.cache
def _architecture(name: str, dynamo: bool):
    return cnn_zoo.build(name, dynamo=dynamo)


def _check(result: cnn_zoo.Sweep) -> None:
    assert not result.wrong, result.wrong
    assert not result.crashed, result.crashed
    assert all(reason and "\n" not in reason for reason in result.refused.values())


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_every_pattern_widens_exactly(dynamo: bool) -> None:
    """Mean pooling and SE (ReduceMean or GlobalAveragePool), hardswish, grouped convs, a split and channel shuffle,
    a scale read twice, a class token: each layer widened by 50% verifies or is refused in one line."""
    _exporter(dynamo)
    result = cnn_zoo.sweep(_patterns(dynamo))
    _check(result)
    assert len(result.excluded) == 1  # the classifier: its channels are the graph output
    verified = set(result.verified)
    if dynamo:
        # all but the two convs read beside the shuffled stream, whose new channels would have to pass
        # backwards through the shuffle and the split before it
        assert len(verified) >= 12, result.refused
    else:
        # the TorchScript exporter computes the shuffle's and the class token's shapes with Shape: those refuse
        assert len(verified) >= 8, result.refused
        assert all("Shape" in r or "shuffle" in r or "size of" in r for r in result.refused.values()), result.refused


def test_inspect_says_per_layer_whether_widen_applies() -> None:
    info = onnxmorph.inspect(_patterns(False))
    verdicts = {layer["name"]: layer["morphs"]["widen"] for layer in info["layers"]}
    assert verdicts["/mb/body/body.0/body.0.0/Conv"]["applies"]  # through hardswish, SE and a residual
    assert "graph output" in verdicts["/fc/Gemm"]["reason"]
    refused = [v["reason"] for v in verdicts.values() if not v["applies"]]
    # the chunk before the shuffle: its size read by Shape, or its slice at bounds computed from it
    assert any(r.startswith(("Shape '/shuffle/Shape' reads the channel count", "Slice '/shuffle/Slice")) for r in
               refused), refused


SAMPLE = {"shufflenet_v2": 8}


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_sweep_sample_on_exported_architectures(name: str) -> None:
    """CI's sample of the sweep below: a few layers of two of the architectures, default exporter."""
    _exporter(True)
    model = _architecture(name, True)
    from conftest import sample_layers

    from onnxmorph.graph import core as mgraph

    names = [info.name for info in mgraph.layers(mgraph.read_view(model))]
    result = cnn_zoo.sweep(model, sample_layers(names, SAMPLE[name], seed=3))
    _check(result)
    assert len(result.verified) >= 0.75 * result.counted, result.refused


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_sweep_widens_90_percent_of_layers(dynamo: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """Every Conv/Gemm/MatMul layer of the ten architectures, widened by 50% (about 2 minutes per exporter).

    Measured (torch 2.x): default exporter 128 of 136 layers (the 8 refusals are ConvNeXt's, at its
    LayerNorm over the channels); dynamo=False 120 of 136 (ShuffleNet's chunk and shuffle computed
    from Shape).
    """
    _exporter(dynamo)
    verified = counted = 0
    lines = []
    for name in cnn_zoo.ARCHITECTURES:
        result = cnn_zoo.sweep(_architecture(name, dynamo))
        _check(result)
        verified, counted = verified + len(result.verified), counted + result.counted
        lines.append(f"{name}: {len(result.verified)} of {result.counted}; refused: {dict(result.reasons())}")
    with capsys.disabled():
        print(f"\nwiden sweep ({'dynamo' if dynamo else 'torchscript'}): {verified} of {counted}\n" + "\n".join(lines))
    if dynamo:
        assert verified >= 0.9 * counted, lines
