"""The pass contract: requires() returns the plan, call() applies it, ensures() checks; no caches."""

from __future__ import annotations

from typing import Any

import onnx
import pytest
from conftest import reference_model

import onnxmorph
from onnxmorph.contract.passinfra import MorphPass, PassResult
from onnxmorph.contract.registry import REGISTRY
from onnxmorph.errors import OnnxMorphError
from onnxmorph.graph import core as mgraph
from onnxmorph.pipeline import inspection


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls = [0]
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_inspect_imports_and_infers_each_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = reference_model("resnet_mini")
    imports = _counting(monkeypatch, mgraph, "import_graph")
    inferences = _counting(monkeypatch, mgraph, "infer_shapes")
    info = onnxmorph.inspect(model)
    assert len(info["layers"]) > 5
    assert imports[0] == 1 and inferences[0] == 1


def test_one_morph_reads_its_model_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = reference_model("cifar10_quick")
    imports = _counting(monkeypatch, mgraph, "import_graph")
    for name, params in (("deepen", {"layer": "conv2"}), ("kernel", {"layer": "conv2", "size": 7}),
                         ("subnet", {"layer": "conv2", "kind": "residual"})):
        imports[0] = 0
        onnxmorph.morph(model, name, verify=False, **params)
        # one read view for requires() (shared with the size estimate), one editable graph for call()
        assert imports[0] == 2, name


def test_the_plan_goes_from_requires_to_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = reference_model("mlp_relu")
    step = onnxmorph.get_pass("deepen")(layer="fc2")
    plan = step.requires(model)

    def no_planning(*args: Any) -> Any:
        raise AssertionError("call() planned again")

    monkeypatch.setattr(step, "_plan", no_planning)
    child = step.call(model, plan).model
    assert onnxmorph.verify(model, child, trials=1)


def test_no_module_level_caches() -> None:
    for module in (mgraph, inspection):
        caches = [name for name in vars(module) if "CACHE" in name.upper() and not name.startswith("__")]
        assert not caches, module.__name__
    for cls in REGISTRY.values():
        assert not [name for name in vars(cls) if name.startswith("_solved")]


class _Broken(MorphPass):
    name = "broken"

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def requires(self, model: Any) -> None:
        return None

    def call(self, model: Any, plan: Any) -> PassResult:
        model = mgraph.model_of(model)
        child = onnx.ModelProto()
        child.CopyFrom(model)
        if self.how == "same":
            return PassResult(model, False)
        if self.how == "interface":
            child.graph.output[0].name = "renamed"
        elif self.how == "opset":
            child.graph.node.append(onnx.helper.make_node("Gelu", ["logits"], ["unused"], name="new"))
        elif self.how == "modified":
            return PassResult(child, True)
        return PassResult(child, self.how != "unmodified")


@pytest.mark.parametrize("how", ["same", "interface", "opset", "modified"])
def test_ensures_catches_a_broken_pass(how: str) -> None:
    model = reference_model("mlp_relu")  # opset 13: no Gelu
    with pytest.raises(OnnxMorphError, match="a bug in onnxmorph"):
        _Broken(how).apply(model)


def test_ensures_accepts_an_honest_no_op() -> None:
    model = reference_model("mlp_relu")
    result = _Broken("unmodified").apply(model)
    assert result.modified is False


def test_one_widen_analyses_its_channels_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxmorph.analysis import channels

    analyses = _counting(monkeypatch, channels, "analyze")
    model = reference_model("resnet_mini")
    onnxmorph.widen(model, layer="s1b1_conv1", width=24, verify=False)
    assert analyses[0] == 1
    analyses[0] = 0
    info = onnxmorph.inspect(model)
    probed = sum(1 for layer in info["layers"] if "widen" in layer["morphs"])
    # once per layer that widen is asked about (the concat skip is not asked per layer)
    assert analyses[0] <= probed
