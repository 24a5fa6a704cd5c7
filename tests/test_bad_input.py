"""Bad input of every kind, through the CLI and the API: one clear line, exit 2, nothing written or changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import MODELS
from robust_support import (
    PASSES,
    applicable,
    assert_refused,
    cli_flags,
    first_use,
    layer_params,
    listing,
    no_layer_model,
    reference,
    run_cli,
    run_cli_batch,
    run_main,
    small_cnn,
    small_mlp_matmul,
    unwritable,
    write_broken_files,
)

import onnxmorph
from onnxmorph.contract.registry import REGISTRY

BROKEN = ["missing", "empty", "random", "truncated", "checker", "folder"]
# Every command that reads a model: the fixed ones and one per registered pass.
COMMANDS = ["inspect", "verify-parent", "verify-child", "apply", *PASSES]


def _copy_reference(folder: Path, stem: str) -> Path:
    target = folder / f"{stem}.onnx"
    shutil.copyfile(MODELS / f"{stem}.onnx", target)
    return target


def _recipe(folder: Path, steps: Any, name: str = "recipe.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(steps))
    return path


def _command_line(command: str, model: Path, folder: Path) -> list[str]:
    """Arguments that run `command` on `model`, with otherwise valid parameters."""
    good = folder / "good.onnx"
    if not good.exists():
        shutil.copyfile(MODELS / "mlp_relu.onnx", good)
    if command == "inspect":
        return ["inspect", model]
    if command == "verify-parent":
        return ["verify", model, good]
    if command == "verify-child":
        return ["verify", good, model]
    if command == "apply":
        recipe = _recipe(folder, [{"morph": "nothing"}]) if not PASSES else _recipe(
            folder, [{"morph": PASSES[0], **first_use(PASSES[0])[1].config}])
        return ["apply", model, "--recipe", recipe, "-o", "out.onnx"]
    stem, step = first_use(command)
    return [command, model, "-o", "out.onnx", *cli_flags(step)]


def _refused_without_trace(folder: Path, args: list[Any], capfd: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run in-process; assert one line, exit 2, and that no file under `folder` appeared or changed."""
    before = listing(folder)
    line = assert_refused(run_main(args, capfd), 2, *needles)
    assert listing(folder) == before
    return line


# --------------------------------------------------------------------------- unreadable models


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", BROKEN)
def test_every_command_refuses_an_unreadable_model(
    kind: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    files = write_broken_files(tmp_path / "in")
    args = _command_line(command, files[kind], tmp_path)
    line = _refused_without_trace(tmp_path, args, capfd)
    assert files[kind].name in line


@pytest.mark.parametrize("kind", ["missing", "empty", "random", "truncated", "checker"])
def test_a_real_process_refuses_an_unreadable_model(kind: str, tmp_path: Path) -> None:
    files = write_broken_files(tmp_path)
    before = listing(tmp_path)
    line = assert_refused(run_cli(["inspect", files[kind].name], cwd=tmp_path), 2)
    assert files[kind].name in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["missing", "empty", "random", "truncated", "checker", "folder"])
def test_the_api_refuses_an_unreadable_model(kind: str, tmp_path: Path) -> None:
    files = write_broken_files(tmp_path)
    with pytest.raises(onnxmorph.InvalidModelError) as caught:
        onnxmorph.load(files[kind])
    assert "\n" not in str(caught.value) and files[kind].name in str(caught.value)
    if kind == "checker":  # the API reports an invalid child as a failed comparison, naming the problem
        report = onnxmorph.verify(MODELS / "mlp_relu.onnx", files[kind])
        assert not report and any("invalid ONNX model" in p for p in report.problems)
    else:
        with pytest.raises(onnxmorph.InvalidModelError):
            onnxmorph.verify(MODELS / "mlp_relu.onnx", files[kind])
    for name in PASSES:
        _, step = first_use(name)
        with pytest.raises(onnxmorph.InvalidModelError):
            onnxmorph.morph(files[kind], name, **step.config)


def test_the_messages_for_each_kind_say_what_is_wrong(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    files = write_broken_files(tmp_path)
    expected = {
        "missing": "no such file", "empty": "empty", "random": "not an ONNX model",
        "truncated": "not an ONNX model", "checker": "invalid ONNX model", "folder": "folder",
    }
    for kind, words in expected.items():
        assert_refused(run_main(["inspect", files[kind]], capfd), 2, words)


# --------------------------------------------------------------------------- layers that cannot be morphed


@pytest.mark.parametrize("name", PASSES)
def test_a_model_without_morphable_layers_is_refused(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "plain.onnx"
    onnx.save(no_layer_model(), path)
    _, step = first_use(name)
    _refused_without_trace(tmp_path, [name, path, "-o", "out.onnx", *cli_flags(step)], capfd)
    recipe = _recipe(tmp_path, [{"morph": name, **step.config}])
    _refused_without_trace(tmp_path, ["apply", path, "--recipe", recipe, "-o", "out.onnx"], capfd)
    with pytest.raises(onnxmorph.OnnxMorphError) as caught:
        onnxmorph.morph(path, name, **step.config)
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_inspect_lists_no_layers_of_a_model_without_any(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plain.onnx"
    onnx.save(no_layer_model(), path)
    result = run_main(["inspect", "--json", path], capfd)
    assert result.code == 0 and json.loads(result.out)["layers"] == []


@pytest.mark.parametrize("name", PASSES)
def test_an_unknown_layer_name_is_refused(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    stem, step = first_use(name)
    model = _copy_reference(tmp_path, stem)
    for param in layer_params(REGISTRY[name]):
        flags = cli_flags(step, **{param: "no_such_layer"})
        _refused_without_trace(tmp_path, [name, model, "-o", "out.onnx", *flags], capfd, "no_such_layer")
        with pytest.raises(onnxmorph.OnnxMorphError, match="no_such_layer"):
            onnxmorph.morph(model, name, **{**step.config, param: "no_such_layer"})


def _clean_use(name: str) -> tuple[str, Any] | None:
    """A probed instance of `name` on one of the tiny clean models, with the model's kind."""
    for kind, build in (("cnn", small_cnn), ("mlp", small_mlp_matmul)):
        steps = applicable(name, build())
        if steps:
            return kind, steps[0]
    return None


# Passes that morph one named layer (its weight is what they rewrite).
LAYER_PASSES = [name for name in PASSES if len(layer_params(REGISTRY[name])) == 1]
# Passes that join two tensors and can concatenate (the consumers' weights then grow).
JOIN_PASSES = [
    name for name in PASSES
    if len(layer_params(REGISTRY[name])) == 2
    and any(p.choices and "concat" in p.choices for p in REGISTRY[name].params)
]


@pytest.mark.parametrize("defect", ["shared", "computed"])
@pytest.mark.parametrize("name", LAYER_PASSES)
def test_a_weight_that_is_not_an_exclusive_constant_is_refused(
    name: str, defect: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    found = _clean_use(name)
    kind, step = found if found is not None else ("cnn", first_use(name)[1])
    build = small_cnn if kind == "cnn" else small_mlp_matmul
    bad = build(**{defect: True})
    onnx.checker.check_model(bad)
    path = tmp_path / f"{defect}.onnx"
    onnx.save(bad, path)
    layer = "conv2" if kind == "cnn" else "fc2"
    targets = layer_params(REGISTRY[name])
    assert targets, f"{name} names no layer"
    # Point every layer parameter at the defective layer (the shared weight is also conv3's/fc3's).
    override = {param: layer for param in targets}
    line = _refused_without_trace(tmp_path, [name, path, "-o", "out.onnx", *cli_flags(step, **override)], capfd)
    assert any(word in line for word in (layer, "W2")), line
    with pytest.raises(onnxmorph.OnnxMorphError) as caught:
        onnxmorph.morph(bad, name, **{**step.config, **override})
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


@pytest.mark.parametrize(("defect", "target"), [("shared", "r2"), ("computed", "r1")])
@pytest.mark.parametrize("name", JOIN_PASSES)
def test_a_concat_into_a_layer_whose_weight_is_not_an_exclusive_constant_is_refused(
    name: str, defect: str, target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # Concatenating onto r2 (r1) widens the input of conv3 (conv2), whose weight is shared (computed).
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{defect}.onnx"
    onnx.save(small_cnn(**{defect: True}), path)
    source, dest = layer_params(REGISTRY[name])
    mode = next(p.cli_flag for p in REGISTRY[name].params if p.choices and "concat" in p.choices)
    flags: list[str] = []
    for p in REGISTRY[name].params:
        if p.name in (source, dest):
            flags += [p.cli_flag, "h1" if p.name == source else target]
    flags += [mode, "concat"]
    line = _refused_without_trace(tmp_path, [name, path, "-o", "out.onnx", *flags], capfd)
    assert "W2" in line or "conv2" in line or "conv3" in line, line


# --------------------------------------------------------------------------- sizes


def _output_channels(model: onnx.ModelProto, layer: str) -> int:
    node = next(n for n in model.graph.node if layer in (n.name, n.output[0]))
    weight = next(t for t in model.graph.initializer if t.name == node.input[1])
    if node.op_type in ("Conv",):
        return int(weight.dims[0])
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return int(weight.dims[0] if trans_b else weight.dims[1])
    return int(weight.dims[-1])


def _kernel_use() -> tuple[str, Any, int]:
    """A reference model, a kernel pass instance on a conv with a kernel of at least 3, and that size."""
    for stem in ("cifar10_quick", "vgg_bn", "resnet_mini", "inception_mini", "mobilenet_mini"):
        model = reference(stem)
        for step in applicable("kernel", model):
            layer = step.config[layer_params(REGISTRY["kernel"])[0]]
            node = next(n for n in model.graph.node if layer in (n.name, n.output[0]))
            weight = next(t for t in model.graph.initializer if t.name == node.input[1])
            if min(weight.dims[2:]) >= 3:
                return stem, step, int(min(weight.dims[2:]))
    raise AssertionError("no conv with a kernel of 3 or more accepts the kernel pass")


# (pass, parameter, value): "smaller" means one less than the layer's current size.
SIZE_CASES: list[tuple[str, str, str]] = []
if "widen" in REGISTRY:
    SIZE_CASES += [("widen", "width", v) for v in ("smaller", "0", "-4")]
if "kernel" in REGISTRY:
    SIZE_CASES += [("kernel", "size", v) for v in ("smaller", "0", "-3")]
if "deepen" in REGISTRY:
    SIZE_CASES += [("deepen", "kernel", v) for v in ("0", "-1")] + [("deepen", "width", v) for v in ("0", "-3")]


@pytest.mark.parametrize(("name", "param", "value"), SIZE_CASES)
def test_a_size_that_would_shrink_or_vanish_is_refused(
    name: str, param: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    if name == "kernel":
        stem, step, current = _kernel_use()
        size: Any = current - 2 if value == "smaller" else int(value)
    else:
        stem, step = first_use(name)
        layer = step.config[layer_params(REGISTRY[name])[0]]
        current = _output_channels(reference(stem), layer)
        size = current - 1 if value == "smaller" else int(value)
    model = _copy_reference(tmp_path, stem)
    flag = next(p.cli_flag for p in REGISTRY[name].params if p.name == param)
    flags = cli_flags(step)
    if flag in flags:
        index = flags.index(flag)
        flags[index + 1] = str(size)
    else:
        flags += [flag, str(size)]
    _refused_without_trace(tmp_path, [name, model, "-o", "out.onnx", *flags], capfd)
    with pytest.raises(onnxmorph.OnnxMorphError) as caught:
        getattr(onnxmorph, name)(reference(stem), **{**step.config, param: size})
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


# --------------------------------------------------------------------------- output paths


WRITERS = [*PASSES[:1], "apply"] if PASSES else []


def _writer_args(command: str, model: Path, output: str, folder: Path) -> list[Any]:
    name = PASSES[0]
    _, step = first_use(name)
    if command == "apply":
        recipe = _recipe(folder, [{"morph": name, **step.config}])
        return ["apply", model, "--recipe", recipe, "-o", output]
    return [name, model, "-o", output, *cli_flags(step)]


@pytest.mark.parametrize("command", WRITERS)
def test_bad_output_paths_are_refused_before_any_work(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    stem, _ = first_use(PASSES[0])
    model = _copy_reference(tmp_path, stem)
    (tmp_path / "a_folder").mkdir()
    cases = {
        "no_such_folder/child.onnx": "does not exist",
        model.name: "overwrite the parent",
        f"./{model.name}": "overwrite the parent",
        str(model): "overwrite the parent",
        "a_folder": "folder",
    }
    for output, words in cases.items():
        _refused_without_trace(tmp_path, _writer_args(command, model, output, tmp_path), capfd, words)
    # A symlink to the parent is the parent too.
    (tmp_path / "alias.onnx").symlink_to(model)
    _refused_without_trace(tmp_path, _writer_args(command, model, "alias.onnx", tmp_path), capfd, "overwrite")
    with unwritable(tmp_path / "locked") as locked:
        _refused_without_trace(tmp_path, _writer_args(command, model, str(locked / "child.onnx"), tmp_path), capfd)


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_over_the_parents_external_weights_is_refused(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    stem, _ = first_use(PASSES[0])
    # The parent keeps its weights in "out.onnx.data", the name a child "out.onnx" would write.
    model = tmp_path / "parent.onnx"
    onnx.save_model(onnx.load(MODELS / f"{stem}.onnx"), model, save_as_external_data=True,
                    location="out.onnx.data", size_threshold=0)
    for output in ("out.onnx.data", "out.onnx"):
        if output == "out.onnx":
            (tmp_path / "out.onnx").write_bytes(b"an earlier output")
        _refused_without_trace(tmp_path, _writer_args(command, model, output, tmp_path), capfd, "parent's weights")
        (tmp_path / "out.onnx").unlink(missing_ok=True)


def test_api_save_refuses_bad_output_paths(tmp_path: Path) -> None:
    model = reference("mlp_relu")
    with pytest.raises(onnxmorph.UsageError, match="does not exist"):
        onnxmorph.save(model, tmp_path / "nowhere" / "child.onnx")
    with pytest.raises(onnxmorph.UsageError, match="folder"):
        onnxmorph.save(model, tmp_path)
    with unwritable(tmp_path / "locked") as locked:
        with pytest.raises(onnxmorph.UsageError):
            onnxmorph.save(model, locked / "child.onnx")
        assert not list(locked.glob("*child*"))


# --------------------------------------------------------------------------- recipes


def _recipe_cases() -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = [
        ("unknown-step", [{"morph": "no_such_morph"}]),
        ("not-a-list", {"morph": "x"}),
        ("empty", []),
        ("step-is-a-string", ["widen"]),
        ("no-morph-name", [{"layer": "fc1"}]),
        ("morph-name-not-a-string", [{"morph": 5}]),
        ("invalid-json", "{not json"),
    ]
    for name in PASSES:
        _, step = first_use(name)
        config = dict(step.config)
        cases.append((f"{name}-unknown-parameter", [{"morph": name, **config, "bogus": 1}]))
        cases.append((f"{name}-files-in-a-step", [{"morph": name, **config, "output": "x.onnx"}]))
        for param in layer_params(REGISTRY[name]):
            cases.append((f"{name}-{param}-not-a-name", [{"morph": name, **config, param: 5}]))
        for p in REGISTRY[name].params:
            if isinstance(config.get(p.name), int) and not isinstance(config.get(p.name), bool):
                cases.append((f"{name}-{p.name}-wrong-type", [{"morph": name, **config, p.name: "abc"}]))
                cases.append((f"{name}-{p.name}-a-list", [{"morph": name, **config, p.name: {"a": 1}}]))
        # A broken second step refuses the whole recipe, before the first step is applied.
        cases.append((f"{name}-second-step-unknown", [{"morph": name, **config}, {"morph": "nope"}]))
    return cases


RECIPES = _recipe_cases()


@pytest.mark.parametrize(("label", "steps"), RECIPES, ids=[label for label, _ in RECIPES])
def test_a_bad_recipe_is_refused(
    label: str, steps: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    model = _copy_reference(tmp_path, first_use(PASSES[0])[0] if PASSES else "mlp_relu")
    path = tmp_path / "recipe.json"
    path.write_text(steps if isinstance(steps, str) else json.dumps(steps))
    line = _refused_without_trace(tmp_path, ["apply", model, "--recipe", path, "-o", "out.onnx"], capfd)
    assert "recipe.json" in line
    if not isinstance(steps, str):
        with pytest.raises(onnxmorph.UsageError):
            onnxmorph.apply(model, steps)


def test_a_missing_or_yaml_exploit_recipe_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    model = _copy_reference(tmp_path, "mlp_relu")
    _refused_without_trace(tmp_path, ["apply", model, "--recipe", "nope.json", "-o", "out.onnx"], capfd, "nope.json")
    evil = tmp_path / "evil.yaml"
    evil.write_text('- !!python/object/apply:os.system ["touch PWNED"]\n')
    _refused_without_trace(tmp_path, ["apply", model, "--recipe", evil, "-o", "out.onnx"], capfd)
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- --inputs


def _bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Input files for mlp_relu (one input 'input' of shape [N, 784]) that do not fit it."""
    cases = {
        "wrong-name": ({"x": np.zeros((2, 784), np.float32)}, "input"),
        "extra-name": ({"input": np.zeros((2, 784), np.float32), "other": np.zeros(1)}, "other"),
        "wrong-size": ({"input": np.zeros((2, 783), np.float32)}, "783"),
        "wrong-rank": ({"input": np.zeros((784,), np.float32)}, "dimensions"),
        "wrong-type": ({"input": np.full((2, 784), "a")}, "input"),
        "no-arrays": ({}, "input"),
    }
    files = {}
    folder.mkdir()
    for label, (arrays, words) in cases.items():
        path = folder / f"{label}.npz"
        np.savez(path, **arrays)
        files[label] = (path, words)
    (folder / "not-npz.npz").write_bytes(b"this is not an npz")
    files["not-npz"] = (folder / "not-npz.npz", "npz")
    files["missing"] = (folder / "missing.npz", "no such file")
    return files


@pytest.mark.parametrize("command", ["verify", *PASSES])
def test_inputs_that_do_not_match_the_model_are_refused(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    model = _copy_reference(tmp_path, "mlp_relu")
    files = _bad_inputs(tmp_path / "inputs")
    if command == "verify":
        base: list[Any] = ["verify", model, model]
    else:
        steps = applicable(command, reference("mlp_relu"), limit=1)
        stem, step = ("mlp_relu", steps[0]) if steps else first_use(command)
        model = _copy_reference(tmp_path, stem)
        if stem != "mlp_relu":  # the arrays are shaped for mlp_relu's input; only names can be tested
            files = {k: v for k, v in files.items() if k in ("wrong-name", "extra-name", "not-npz", "missing")}
        base = [command, model, "-o", "out.onnx", *cli_flags(step)]
    for label, (path, words) in files.items():
        line = _refused_without_trace(tmp_path, [*base, "--inputs", path], capfd, words)
        assert "inputs" in line or path.name in line, (label, line)
    with pytest.raises(onnxmorph.UsageError):
        onnxmorph.verify(model, model, inputs=files["wrong-name"][0])


def test_bad_shapes_and_options_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    model = _copy_reference(tmp_path, "mlp_relu")
    for extra in (["--shape", "input:2x783"], ["--shape", "nope:2x784"], ["--shape", "input:axb"],
                  ["--shape", "input:0x784"], ["--trials", "0"], ["--atol", "-1"], ["--atol", "nan"],
                  ["--trials", "many"], ["--no-such-flag"]):
        _refused_without_trace(tmp_path, ["verify", model, model, *extra], capfd)
    _refused_without_trace(tmp_path, ["no-such-command", model], capfd)


# --------------------------------------------------------------------------- exit codes and output modes


def _changed_copy(folder: Path) -> Path:
    model = onnx.load(MODELS / "mlp_relu.onnx")
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2)
    array = onnx.numpy_helper.to_array(weight).copy()
    array[0, 0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    path = folder / "changed.onnx"
    onnx.save(model, path)
    return path


def test_exit_codes_json_and_quiet(tmp_path: Path) -> None:
    model = _copy_reference(tmp_path, "mlp_relu")
    changed = _changed_copy(tmp_path)
    same, differ, as_json, inspected, bad = run_cli_batch([
        ["verify", model.name, model.name, "--trials", "1", "-q"],
        ["verify", model.name, changed.name, "--trials", "1"],
        ["verify", model.name, changed.name, "--trials", "1", "--json"],
        ["inspect", model.name, "--json"],
        ["inspect", "nope.onnx", "--json"],
    ], cwd=tmp_path, report=tmp_path.parent / "exit-codes.json")
    assert same.code == 0 and same.err == "" and same.out == ""
    assert_refused(differ, 1)
    assert as_json.code == 1 and json.loads(as_json.out)["verification"]["passed"] is False
    assert inspected.code == 0 and inspected.err == ""
    assert [layer["name"] for layer in json.loads(inspected.out)["layers"]]
    assert_refused(bad, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed.onnx", "mlp_relu.onnx"]


@pytest.mark.parametrize("name", PASSES)
def test_every_pass_command_exits_0_with_json_and_is_silent_with_q(name: str, tmp_path: Path) -> None:
    stem, step = first_use(name)
    model = _copy_reference(tmp_path, stem)
    parent = model.read_bytes()
    as_json, quiet = run_cli_batch([
        [name, model.name, "-o", "a.onnx", "--json", "--trials", "1", *cli_flags(step)],
        [name, model.name, "-o", "b.onnx", "-q", "--trials", "1", *cli_flags(step)],
    ], cwd=tmp_path, report=tmp_path.parent / f"{name}.json")
    assert as_json.code == 0 and as_json.err == "", as_json.err
    data = json.loads(as_json.out)
    assert data["verification"]["passed"] is True and data["steps"][0]["pass"] == name
    assert quiet.code == 0 and quiet.err == "" and quiet.out == ""
    assert model.read_bytes() == parent
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.onnx", "b.onnx", model.name])
    assert onnxmorph.verify(model, tmp_path / "b.onnx", trials=1)


def test_a_broken_pipe_is_not_an_internal_error(tmp_path: Path) -> None:
    model = _copy_reference(tmp_path, "mlp_relu")
    proc = subprocess.Popen([sys.executable, "-m", "onnxmorph", "inspect", model.name], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader went away, as with `onnxmorph inspect m.onnx | head -0`
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "internal error" not in err and "Exception ignored" not in err, err
    assert proc.returncode != 3
