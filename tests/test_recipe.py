"""Tests of recipes: the reader (JSON, YAML), `apply` on the API and the CLI, --verify-each, shipped recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, reference_model

import onnxmorph
from onnxmorph.contract.passinfra import MorphPass, Param, PassResult, layer_name
from onnxmorph.contract.registry import REGISTRY
from onnxmorph.errors import NotApplicable, UsageError, VerificationFailed
from onnxmorph.graph import core as mgraph
from onnxmorph.pipeline.recipe import read_recipe

RECIPES = MODELS / "recipes"
SHIPPED = {
    "cifar10_quick_222": "cifar10_quick",
    "cifar10_quick_333": "cifar10_quick",
    "cifar10_quick_333_wide": "cifar10_quick",
    "resnet_mini_1c1": "resnet_mini",
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxmorph", *args], capture_output=True, text=True)


def test_every_shipped_recipe_is_listed() -> None:
    assert sorted(p.stem for p in RECIPES.glob("*.json")) == sorted(SHIPPED)


@pytest.mark.parametrize("recipe", sorted(SHIPPED))
def test_shipped_recipes_run_from_the_cli_and_verify(recipe: str, tmp_path: Path) -> None:
    out = tmp_path / f"{recipe}.onnx"
    proc = _cli("apply", str(MODELS / f"{SHIPPED[recipe]}.onnx"), "--recipe", str(RECIPES / f"{recipe}.json"),
                "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout and out.is_file()
    child = onnxmorph.load(out)
    steps = json.loads((RECIPES / f"{recipe}.json").read_text())
    history = onnxmorph.history(child)
    assert [s["pass"] for s in history[-1]["steps"]] == [s["morph"] for s in steps]
    convs = [i.name for i in mgraph.layers(mgraph.read_view(child)) if i.op == "Conv"]
    if recipe == "cifar10_quick_222":
        assert len(convs) == 6
    elif recipe.startswith("cifar10_quick_333"):
        assert len(convs) == 9
        # the third layer of a stage is the deepened second layer: names say how it was made
        assert "conv2/morph_deepen/conv_b/morph_deepen/conv_b" in convs
    else:
        assert sum(name.endswith("/morph_subnet/branch/conv_1") for name in convs) == 8


def test_widened_recipe_widens() -> None:
    child = onnxmorph.apply(reference_model("cifar10_quick"), RECIPES / "cifar10_quick_333_wide.json", trials=1)
    info = {i.name: i for i in mgraph.layers(mgraph.read_view(child))}
    assert info["conv1/morph_deepen/conv_a"].weight_shape[0] == 64
    assert info["conv3/morph_deepen/conv_a"].weight_shape[0] == 128
    assert info["fc1"].weight_shape[0] == 128


def test_api_list_recipe_and_later_steps_use_earlier_names() -> None:
    parent = reference_model("cifar10_quick")
    steps = [
        {"morph": "subnet", "layer": "conv2", "kind": "sequential", "depth": 2},
        {"morph": "kernel", "layer": "conv2/morph_subnet/conv_2", "size": 5},
        {"morph": "skip", "source": "relu1_out", "target": "relu2_out"},
    ]
    child = onnxmorph.apply(parent, steps, trials=2)
    assert onnxmorph.verify(parent, child)
    names = {n.name for n in child.graph.node}
    assert {"conv2/morph_subnet/conv_1", "conv2/morph_subnet/conv_2", "relu2_out/morph_skip/add"} <= names


def test_yaml_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - morph: kernel\n    layer: conv1\n    size: 7\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="PyYAML"):
            read_recipe(path)
        return
    [step] = read_recipe(path)
    assert step.name == "kernel" and step.config["size"] == (7,)


@pytest.mark.parametrize("text,reason", [
    ("{}", "non-empty list"),
    ("[1]", "step 1 is a int"),
    ('[{"layer": "conv1"}]', "no \"morph\" name"),
    ('[{"morph": "shrink"}]', "unknown morph 'shrink'"),
    ('[{"morph": "kernel", "layer": "conv1"}]', "missing parameter 'size'"),
    ('[{"morph": "kernel", "layer": "conv1", "size": 5, "output": "x.onnx"}]', "not files"),
    ("[{", "not valid JSON"),
])
def test_bad_recipes(text: str, reason: str, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=reason):
        read_recipe(path)


def test_a_step_that_does_not_apply_is_named() -> None:
    steps = [{"morph": "kernel", "layer": "conv1", "size": 7}, {"morph": "kernel", "layer": "fc1", "size": 3}]
    with pytest.raises(NotApplicable, match=r"^step 2 \(kernel\): layer 'fc1' is a Gemm"):
        onnxmorph.apply(reference_model("cifar10_quick"), steps)


class _Breaks(MorphPass):
    """A deliberately wrong morph (doubles a weight), to see --verify-each name the step."""

    name = "test_breaks"
    params = (Param("layer", layer_name, "layer"),)

    def requires(self, model: onnx.ModelProto) -> None:
        return None

    def call(self, model: onnx.ModelProto, plan: None) -> PassResult:
        model = mgraph.model_of(model)
        graph = mgraph.import_graph(model)
        node = mgraph.find_layer(graph, self.layer)
        mgraph.set_input_constant(node, 1, 2 * np.asarray(mgraph.values(node.inputs[1])))
        return PassResult(mgraph.export_model(graph, like=model), True)


@pytest.fixture
def breaking_pass():
    REGISTRY[_Breaks.name] = _Breaks
    try:
        yield _Breaks.name
    finally:
        del REGISTRY[_Breaks.name]


def test_verify_each_names_the_step_that_broke(breaking_pass: str) -> None:
    parent = reference_model("cifar10_quick")
    steps = [{"morph": "kernel", "layer": "conv1", "size": 7}, {"morph": breaking_pass, "layer": "conv2"},
             {"morph": "kernel", "layer": "conv3", "size": 7}]
    with pytest.raises(VerificationFailed, match=r"^step 2 \(_Breaks\(layer='conv2'\)\): FAIL"):
        onnxmorph.apply(parent, steps, verify_each=True, trials=1)
    # without --verify-each the one verification at the end still refuses the child
    with pytest.raises(VerificationFailed, match="^FAIL"):
        onnxmorph.apply(parent, steps, trials=1)
    with pytest.raises(VerificationFailed, match=r"^step 2 \(_Breaks"):
        onnxmorph.apply(parent, steps[:2], verify_each=True, trials=1)


def test_cli_verify_each_and_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps([{"morph": "kernel", "layer": "conv1", "size": 7},
                                  {"morph": "deepen", "layer": "conv1_out"}]))
    out = tmp_path / "child.onnx"
    proc = _cli("apply", str(MODELS / "cifar10_quick.onnx"), "--recipe", str(recipe), "-o", str(out),
                "--verify-each", "--trials", "1")
    assert proc.returncode == 0, proc.stderr
    recipe.write_text(json.dumps([{"morph": "kernel", "layer": "nope", "size": 7}]))
    proc = _cli("apply", str(MODELS / "cifar10_quick.onnx"), "--recipe", str(recipe), "-o", str(tmp_path / "x.onnx"))
    assert proc.returncode == 2 and "no layer 'nope'" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.onnx").exists()
