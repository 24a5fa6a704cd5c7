"""Hostile input, fourth round: export-hf's folders, the moe morph's parameters and graphs, onnxmorph.train on
graphs that ask for any amount of memory, and diff --shape beyond what ONNX counts.

Each case the issue names has a sibling beside it (a variant it does not name). Every refusal is one line
(exit 2 from the CLI, an onnxmorph error from the API) and leaves the folder listing as it was. Cases whose
old behaviour allocated without bound run in a subprocess with a lowered limit variable (and an address-space
limit where a regression would allocate), so that a regression fails instead of exhausting the machine.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import MODELS, text_model
from hf_support import hf_export  # noqa: F401  (fixture)
from onnx import TensorProto, helper, numpy_helper
from robust_support import ROOT, Outcome, assert_refused, leftovers, run_main

import onnxmorph
from onnxmorph import limits
from onnxmorph.analysis import experts as mexperts
from onnxmorph.graph import core as mgraph
from onnxmorph.hf import checkpoint as ckpt

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
pytest.importorskip("transformers")

import onnxmorph.train as ot  # noqa: E402  (needs torch)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def listing(folder: Path) -> dict[str, Any]:
    """Every entry under `folder`: a file's bytes (size and time when over 64 MiB), a symlink's target (never
    followed: one may name /proc/self/mem), a folder's name. Equal listings: nothing was written or changed."""
    found: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_file():
            stat = path.stat()
            found[key] = path.read_bytes() if stat.st_size <= 2**26 else (stat.st_size, stat.st_mtime_ns)
        else:
            found[key] = ("folder",)
    return found


def _bounded(args: list[str], cwd: Path, timeout: float = 90, memory: int = 6 * 2**30, **env: str) -> Outcome:
    """`python ARGS` with at most `memory` bytes of address space, killed at `timeout`: a regression that
    allocates without bound fails (MemoryError, or the timeout) instead of taking the machine's memory."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


# =========================================================================== export-hf

@pytest.fixture(scope="module")
def hf_work(hf_export, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A folder with parent_hf/ (save_pretrained), parent.onnx (its export) and child.onnx (a block inserted)."""
    hf = hf_export("llama", False)
    folder = tmp_path_factory.mktemp("hf_work") / "work"
    folder.mkdir()
    hf.hf_model.save_pretrained(folder / "parent_hf")
    shutil.copy(hf.path, folder / "parent.onnx")
    onnxmorph.save(onnxmorph.block(onnxmorph.load(folder / "parent.onnx"), after=0), folder / "child.onnx")
    return folder


@pytest.fixture
def work(hf_work: Path, tmp_path: Path) -> Path:
    """A copy of hf_work to tamper with (tmp_path holds only it)."""
    target = tmp_path / "work"
    shutil.copytree(hf_work, target, symlinks=True)
    return target


def _export_args(work: Path, out: str | Path = "out", like: str | Path = "parent_hf", *more: str) -> list[str]:
    return ["export-hf", str(work / "child.onnx"), "--like", str(work / like), "-o", str(work / out),
            "--parent", str(work / "parent.onnx"), "--no-check", *more]


def _refused_unchanged(work: Path, args: list[str], capfd: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI in this process: one line, exit 2, the needles in it, and the folder exactly as it was."""
    before = listing(work.parent)
    line = assert_refused(run_main(args, capfd), 2, *needles)
    assert listing(work.parent) == before, "a refusal changed the folder"
    assert leftovers(work.parent) == [] and not any(p.name.startswith(".") for p in work.rglob("*"))
    return line


def _config(work: Path) -> dict[str, Any]:
    return json.loads((work / "parent_hf" / "config.json").read_text())


# The cases (a config nested 100000 deep, one too large to read, an integer of 5000 digits), and
# siblings in the safetensors index, which went through another reader.
_JSON_CASES = {
    "config nested": ("config.json", lambda w: "[" * 100000 + "]" * 100000, "nested too deeply"),
    "config integer": ("config.json", lambda w: json.dumps(_config(w))[:-1] + ', "x": ' + "9" * 5000 + "}",
                       "4300 digits"),
    "config too large": ("config.json", None, "larger than 16 MiB"),
    "index nested": ("model.safetensors.index.json", lambda w: '{"weight_map":' * 5000 + "1" + "}" * 5000,
                     "nested too deeply"),
    "index map of lists": ("model.safetensors.index.json", lambda w: json.dumps({"weight_map": {"k": ["a"]}}),
                           "parameter -> file name"),
}


@pytest.mark.parametrize("case", _JSON_CASES)
def test_hf_dir_json_that_is_no_config_is_refused_in_one_line(case: str, work: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    # Before: RecursionError and ValueError were internal errors (exit 3); a 2 GB config was read whole.
    name, text, needle = _JSON_CASES[case]
    target = work / "parent_hf" / name
    if name.startswith("model.safetensors.index"):
        (work / "parent_hf" / "model.safetensors").rename(work / "parent_hf" / "model-00001-of-00001.safetensors")
    if text is None:
        with open(target, "wb") as f:
            f.truncate(2 * 2**30)  # sparse: 2 GiB of zeros, never read
    else:
        target.write_text(text(work))
    _refused_unchanged(work, _export_args(work), capfd, name, needle)


# 'architectures' names the class the comparison loads: a name that is not a model class of the config's own
# family (a function of transformers, another family's class, not a name at all) was an AttributeError (exit 3).
@pytest.mark.parametrize(("architectures", "needle"), [(["pipeline"], "names no transformers model class"),
                                                       (["GPT2LMHeadModel"], "a gpt2 class"),
                                                       (["__import__('os')"], "names no transformers model class"),
                                                       ({"a": 1}, "names no transformers model class")])
def test_a_config_naming_no_model_class_of_its_family_is_refused_in_one_line(
        architectures: Any, needle: str, work: Path, capfd: pytest.CaptureFixture[str]) -> None:
    config = _config(work)
    config["architectures"] = architectures
    (work / "parent_hf" / "config.json").write_text(json.dumps(config))
    args = [a for a in _export_args(work) if a != "--no-check"]
    _refused_unchanged(work, args, capfd, "architectures", needle)


def test_a_config_layer_count_the_tensors_do_not_hold_is_refused_before_sizing_by_it(work: Path) -> None:
    # Before: num_hidden_layers 10**12 numbered that many layers (a list of 10**12 entries: out of memory).
    # In a process with 6 GiB of address space: a regression ends in MemoryError, not in the expected line.
    config = _config(work)
    config["num_hidden_layers"] = 10**12
    (work / "parent_hf" / "config.json").write_text(json.dumps(config))
    before = listing(work)
    done = _bounded(["-m", "onnxmorph", *_export_args(work)], work)
    assert_refused(done, 2, "its tensors hold 2 layers", "num_hidden_layers says 1000000000000")
    assert listing(work) == before


def test_a_config_with_one_layer_too_many_is_refused_too(work: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Sibling: a count close to the truth, which the old code also refused, but only after numbering the layers.
    config = _config(work)
    config["num_hidden_layers"] = 3
    (work / "parent_hf" / "config.json").write_text(json.dumps(config))
    _refused_unchanged(work, _export_args(work), capfd, "its tensors hold 2 layers (model.layers.N for N in 0-1)")


@pytest.mark.parametrize("which", ["tokenizer.json", "model.safetensors", "proc"])
def test_a_symlink_out_of_hf_dir_is_refused_not_copied(which: str, work: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    # Before: tokenizer.json -> a file outside HF_DIR was copied into the child's folder (a shared folder could
    # make export-hf copy ~/.ssh/id_rsa into a checkpoint about to be uploaded); -> /proc/self/mem was an
    # internal error. Sibling: the weights themselves through a symlink out of the folder.
    secret = work / "secret.txt"
    secret.write_text("not for the checkpoint")
    like = work / "parent_hf"
    if which == "tokenizer.json":
        (like / "tokenizer.json").symlink_to(secret)
    elif which == "proc":
        (like / "tokenizer.json").symlink_to("/proc/self/mem")
    else:
        (like / "model.safetensors").rename(work / "weights.safetensors")
        (like / "model.safetensors").symlink_to(work / "weights.safetensors")
    _refused_unchanged(work, _export_args(work), capfd, "is a symlink to", "outside the checkpoint's folder")


def test_the_hugging_face_cache_layout_is_followed(work: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # The counterpart: a hub snapshot's files are symlinks to ../../blobs/HASH, which are read and copied.
    repo = work / "models--me--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (work / "parent_hf" / "tokenizer.json").write_text('{"tokens": 1}')
    for path in (work / "parent_hf").iterdir():
        shutil.move(str(path), repo / "blobs" / f"hash-{path.name}")
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / f"hash-{path.name}")
    result = run_main(_export_args(work, "out", snapshot.relative_to(work)), capfd)
    assert result.code == 0, result.err
    assert (work / "out" / "tokenizer.json").read_text() == '{"tokens": 1}'
    assert not (work / "out" / "tokenizer.json").is_symlink()


def test_an_hf_dir_over_the_model_limit_is_refused_before_it_is_read(work: Path, capfd: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: the weights were read whole whatever their size (and a 50 GB tokenizer.json copied for as long as
    # it took). Sibling: a sparse tokenizer.json (nothing allocated, only its size counts).
    monkeypatch.setenv(limits.MODEL_BYTES.variable, "50000")
    _refused_unchanged(work, _export_args(work), capfd, limits.MODEL_BYTES.variable, "weights and the files copied")
    monkeypatch.setenv(limits.MODEL_BYTES.variable, str(2**30))
    with open(work / "parent_hf" / "tokenizer.json", "wb") as f:
        f.truncate(2 * 2**30)
    _refused_unchanged(work, _export_args(work), capfd, limits.MODEL_BYTES.variable, "2.0 GiB")


def test_shard_files_of_the_parent_are_not_copied_as_tokenizer_files(work: Path,
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    # Found on the way: an index naming `a.safetensors` had that shard copied beside the child's own weights.
    like = work / "parent_hf"
    (like / "model.safetensors").rename(like / "a.safetensors")
    with ckpt._safetensors().safe_open(str(like / "a.safetensors"), framework="np") as f:
        keys = list(f.keys())
    (like / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "a.safetensors" for k in keys}}))
    result = run_main(_export_args(work), capfd)
    assert result.code == 0, result.err
    assert sorted(p.name for p in (work / "out").iterdir()) == ["config.json", "generation_config.json",
                                                               "model.safetensors"]


# OUT_DIR that holds what export-hf reads: replacing it under --force deleted the parent checkpoint, or the
# child (the cases: OUT_DIR equal to the child's folder, containing HF_DIR); inside HF_DIR it added
# a folder to the parent's checkpoint (the case), and `.` was an internal error (a sibling).
_HOLDS_INPUTS = {
    "the child's folder": ("kid", "holds", "child.onnx"),
    "a folder holding HF_DIR": ("..", "holds", "parent_hf"),
    "inside HF_DIR": ("parent_hf/sub", "inside the parent's checkpoint", "--like"),
    "HF_DIR through a symlink": ("link", "is the parent's checkpoint", "--like"),
}


@pytest.mark.parametrize("case", _HOLDS_INPUTS)
def test_an_out_dir_that_would_change_an_input_is_refused_even_with_force(case: str, work: Path,
                                                                          capfd: pytest.CaptureFixture[str]) -> None:
    out, *needles = _HOLDS_INPUTS[case]
    (work / "link").symlink_to("parent_hf")
    (work / "kid").mkdir()
    os.replace(work / "child.onnx", work / "kid" / "child.onnx")
    args = _export_args(work, out, "parent_hf", "--force")
    args[1] = str(work / "kid" / "child.onnx")
    line = _refused_unchanged(work, args, capfd, *needles)
    assert "internal error" not in line


def test_a_symlinked_out_dir_writes_the_folder_it_names(work: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Before: the link was renamed to `.out.old-PID` and left there, and a real folder took its place.
    # Sibling: a dangling link, which was an internal error (NotADirectoryError).
    (work / "target").mkdir()
    (work / "out").symlink_to("target")
    (work / "dangling").symlink_to("nowhere")
    for out, target in (("out", "target"), ("dangling", "nowhere")):
        result = run_main(_export_args(work, out), capfd)
        assert result.code == 0, result.err
        assert (work / out).is_symlink() and (work / target / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["child.onnx", "dangling", "nowhere", "out", "parent.onnx",
                                                      "parent_hf", "target"]


@pytest.mark.parametrize(("out", "needle"), [("/", "is the root folder"), ("x" * 300, "longer than"),
                                             ("", "empty folder name")])
def test_out_dir_names_that_cannot_be_written_are_one_line(out: str, needle: str, work: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    # Before: `/` and a 300-character name were internal errors (ValueError, OSError).
    args = _export_args(work)
    args[args.index("-o") + 1] = out if out != "x" * 300 else str(work / out)
    _refused_unchanged(work, args, capfd, needle)


def _previous_output(work: Path) -> dict[str, Any]:
    (work / "out").mkdir()
    (work / "out" / "mine.txt").write_text("an earlier output")
    return listing(work)


@pytest.mark.parametrize("where", ["weights", "copied file"])
def test_a_full_disk_while_writing_leaves_the_old_folder(where: str, work: Path, capfd: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: safetensors' "No space left on device" was an internal error (exit 3). Sibling: the disk fills
    # while the parent's tokenizer is copied.
    safetensors = ckpt._safetensors()
    (work / "parent_hf" / "tokenizer.json").write_text("{}")
    before = _previous_output(work)

    def full(*args: Any, **kwargs: Any) -> None:
        Path(args[1]).write_bytes(b"partial")  # (save_file(arrays, path), copyfile(source, path))
        if where == "weights":
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                              "error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "weights":
        monkeypatch.setattr(safetensors.numpy, "save_file", full)
    else:
        monkeypatch.setattr(ckpt.shutil, "copyfile", full)
    assert_refused(run_main(_export_args(work, "out", "parent_hf", "--force"), capfd), 2, "No space left on device")
    assert listing(work) == before
    assert sorted(p.name for p in work.iterdir()) == ["child.onnx", "out", "parent.onnx", "parent_hf"]


@pytest.mark.parametrize("when", ["writing", "replacing"])
def test_sigterm_mid_write_leaves_the_old_folder(when: str, work: Path, capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # SIGTERM while the new folder is written (the case), and in the rename that swaps it in (sibling):
    # exit 130, the earlier output as it was, no scratch folder.
    before = _previous_output(work)
    if when == "writing":
        write = ckpt._write_files

        def interrupted(*args: Any) -> None:
            write(*args)
            os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(ckpt, "_write_files", interrupted)
    else:
        replace, calls = os.replace, []

        def interrupted(src: Any, dst: Any) -> None:
            calls.append(dst)
            if len(calls) == 2:  # the old folder moved aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGTERM)
            replace(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", interrupted)
    assert_refused(run_main(_export_args(work, "out", "parent_hf", "--force"), capfd), 130, "interrupted")
    assert listing(work) == before
    assert sorted(p.name for p in work.iterdir()) == ["child.onnx", "out", "parent.onnx", "parent_hf"]


# =========================================================================== moe

_RELU_FFN = {"up": np.random.default_rng(1).normal(size=(4, 8)), "b1": np.random.default_rng(2).normal(size=8),
             "down": np.random.default_rng(3).normal(size=(8, 4)), "b2": np.random.default_rng(4).normal(size=4)}


def _relu_ffn() -> onnx.ModelProto:
    return text_model("h = MatMul(x, up)\n hb = Add(h, b1)\n a = Relu(hb)\n z = MatMul(a, down)\n y = Add(z, b2)",
                      _RELU_FFN, x="float[3, 4]", y="float[3, 4]", opset=13)


@pytest.mark.parametrize(("flags", "needle"), [(["--noise", "800"], "--noise 800"),
                                               (["--router-std", "1e308"], "--router-std 1e+308")])
def test_moe_weights_the_dtype_cannot_hold_are_refused_in_one_line(flags: list[str], needle: str, tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    # Before: RuntimeWarnings on stderr, then "verification failed" (exit 1) for a parameter out of range.
    onnx.save(_relu_ffn(), tmp_path / "ffn.onnx")
    before = listing(tmp_path)
    args = ["moe", tmp_path / "ffn.onnx", "--layer", "z", "--experts", "4", "--top-k", "2", "-o", tmp_path / "c.onnx"]
    assert_refused(run_main([*args, *flags], capfd), 2, needle, "float32 cannot hold")
    assert listing(tmp_path) == before


def test_growing_an_moe_with_noise_the_dtype_cannot_hold_is_refused(hf_export) -> None:  # noqa: F811
    # Sibling: the same overflow growing a Mixtral export's stacked experts.
    parent = onnxmorph.load(hf_export("mixtral", False).path)
    with pytest.raises(onnxmorph.UsageError, match=r"--noise 1e\+300 makes weights that float32 cannot hold"):
        onnxmorph.moe(parent, layer="0", experts=8, top_k=4, noise=1e300)


def _with_output(model: onnx.ModelProto, name: str, elem: int, rank: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(helper.make_tensor_value_info(name, elem, [f"d{k}" for k in range(rank)]))
    return out


def test_shards_of_an_ffn_whose_hidden_units_are_read_outside_it_are_refused() -> None:
    # Before: shard 0 is the FFN's own nodes, so a graph output reading its hidden units changed shape, and
    # verification failed (exit 1). Sibling: a node outside the FFN reads them (into the output).
    as_output = _with_output(_relu_ffn(), "a", TensorProto.FLOAT, 2)
    read = text_model("h = MatMul(x, up)\n hb = Add(h, b1)\n a = Relu(hb)\n z = MatMul(a, down)\n zb = Add(z, b2)\n"
                      " s = ReduceMean <axes = [1]> (a)\n y = Add(zb, s)", _RELU_FFN, x="float[3, 4]",
                      y="float[3, 4]", opset=13)
    for model, needle in ((as_output, "'a' is a graph output"), (read, r"'a' is read by 's' \(ReduceMean\)")):
        with pytest.raises(onnxmorph.NotApplicable, match=needle):
            onnxmorph.moe(model, layer="z", experts=4, top_k=2, shards=2)
        child, report = onnxmorph.morph(model, "moe", layer="z", experts=4, top_k=2)  # one shard: exact
        assert report


def test_an_ffn_whose_output_is_a_graph_output_upcycles_exactly() -> None:
    # The case, which was handled: the mixture takes the output's name.
    model = text_model("h = MatMul(x, up)\n hb = Add(h, b1)\n a = Relu(hb)\n y = MatMul(a, down)", _RELU_FFN,
                       x="float[3, 4]", y="float[3, 4]", opset=13)
    for shards in (1, 2):
        child, report = onnxmorph.morph(model, "moe", layer="y", experts=4, top_k=2, shards=shards)
        assert report and [o.name for o in child.graph.output] == ["y"]


@pytest.mark.parametrize("which", ["router logits", "chosen experts"])
def test_growing_an_moe_whose_routing_is_an_output_is_refused(which: str, hf_export) -> None:  # noqa: F811
    # Before: a Mixtral export with its router logits as an output (output_router_logits) grew, and the
    # output's width changed: verification failed (exit 1). Sibling: the TopK's indices as an output.
    parent = onnxmorph.load(hf_export("mixtral", False).path)
    moe = mexperts.model_moes(mgraph.Analysis(parent))[0]
    name, elem = ((moe.router.outputs[0].name, TensorProto.FLOAT) if which == "router logits"
                  else (moe.topk.outputs[1].name, TensorProto.INT64))
    with pytest.raises(onnxmorph.NotApplicable, match=f"the graph output '{name}' is computed from its router"):
        onnxmorph.moe(_with_output(parent, name, elem, 2), layer="0", experts=8, top_k=4)


def test_moe_sizes_are_refused_by_the_new_weights_estimate(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The bound: experts and shards are sized against the limits before anything is made.
    onnx.save(_relu_ffn(), tmp_path / "ffn.onnx")
    before = listing(tmp_path)
    args = ["moe", tmp_path / "ffn.onnx", "--layer", "z", "-o", tmp_path / "c.onnx", "--top-k", "2"]
    assert_refused(run_main([*args, "--experts", "1000"], capfd), 2, limits.NEW_LAYERS.variable)
    monkeypatch.setenv(limits.NEW_BYTES.variable, "1000")
    assert_refused(run_main([*args, "--experts", "16"], capfd), 2, limits.NEW_BYTES.variable)
    assert_refused(run_main([*args, "--experts", "4", "--shards", str(10**9)], capfd), 2, "shards")
    assert listing(tmp_path) == before


# =========================================================================== onnxmorph.train

def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], opset: int = 17,
           outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


# Graphs whose output is far larger than their inputs, each op that can make one: what the refusal names ->
# (nodes, initializers).
# Sizes are a few GiB, so that a regression (under the subprocess' address-space limit) fails fast.
_I = np.int64
_BLOW_UPS: dict[str, tuple[list[onnx.NodeProto], dict[str, Any]]] = {
    "(ConstantOfShape)": ([helper.make_node("Mul", ["s", "k"], ["t"]),
                           helper.make_node("ConstantOfShape", ["t"], ["y"])],
                          {"s": np.array([20000, 20000], _I), "k": np.array([2, 2], _I)}),
    # a constant shape is sized with the model's declared tensors, when the module is built
    "its declared tensors": ([helper.make_node("ConstantOfShape", ["s"], ["y"])], {"s": np.array([40000, 40000], _I)}),
    "(Range)": ([helper.make_node("Range", ["a", "b", "c"], ["y"])],
                {"a": np.array(0, _I), "b": np.array(10**12, _I), "c": np.array(1, _I)}),
    "(Expand)": ([helper.make_node("Expand", ["x", "s"], ["y"])], {"s": np.array([10**8, 2, 3], _I)}),
    "(Tile)": ([helper.make_node("Tile", ["x", "s"], ["y"])], {"s": np.array([10**5, 10**4], _I)}),
    "(OneHot)": ([helper.make_node("OneHot", ["i", "d", "v"], ["y"])],
                 {"i": np.array([1, 2], _I), "d": np.array([10**12], _I), "v": np.array([0, 1], np.float32)}),
    "(Pad)": ([helper.make_node("Pad", ["x", "p"], ["y"])], {"p": np.array([10**5] * 4, _I)}),
    "(Gather)": ([helper.make_node("Gather", ["w", "i"], ["y"])],
                 {"w": np.ones((2, 10**5), np.float32), "i": np.zeros(10**5, _I)}),
    "(Add)": ([helper.make_node("Add", ["c", "r"], ["y"])],  # a broadcast
              {"c": np.ones((10**5, 1), np.float32), "r": np.ones((1, 10**5), np.float32)}),
    "(MatMul)": ([helper.make_node("MatMul", ["c", "r"], ["y"])],  # an outer product
                 {"c": np.ones((10**5, 1), np.float32), "r": np.ones((1, 10**5), np.float32)}),
    "(Einsum)": ([helper.make_node("Einsum", ["u", "u"], ["y"], equation="i,j->ij")],
                 {"u": np.ones(10**5, np.float32)}),
    "(Concat)": ([helper.make_node("Concat", ["u"] * 20000, ["y"], axis=0)],  # one input listed many times
                 {"u": np.ones(10**5, np.float32)}),
}

_BLOW_UP_DRIVER = r"""
import json, sys
import numpy as np, onnx, torch
import onnxmorph, onnxmorph.train as ot
results = {}
for name in json.loads(sys.argv[1]):
    model = onnx.load(f"{name}.onnx")
    try:
        ot.to_torch(model)(torch.ones(2, 3))
        results[name] = "ran"
    except onnxmorph.OnnxMorphError as exc:
        results[name] = str(exc)
    except MemoryError:
        results[name] = "MemoryError"
print(json.dumps(results))
"""


def test_to_torch_sizes_what_a_graph_asks_for_before_allocating_it(tmp_path: Path) -> None:
    # The cases (ConstantOfShape, Range, Expand/Tile, OneHot of 10**12) and siblings for every other
    # op whose output can outgrow its inputs. Before: torch allocated (or tried to), and a request within the
    # machine's memory took it. Here a limit of 100 MB, and 6 GiB of address space for a regression to fail in.
    names = []
    for k, (nodes, inits) in enumerate(_BLOW_UPS.values()):
        onnx.save(_model(nodes, inits), tmp_path / f"case{k}.onnx")
        names.append(f"case{k}")
    done = _bounded(["-c", _BLOW_UP_DRIVER, json.dumps(names)], tmp_path, timeout=120,
                    **{limits.MODEL_BYTES.variable: "100000000"})
    assert done.code == 0, done.err
    results = json.loads(done.out)
    for needle, key in zip(_BLOW_UPS, names):
        message = results[key]
        assert needle in message and limits.MODEL_BYTES.variable in message and "\n" not in message, message


@pytest.mark.parametrize(("nodes", "inits", "needle"), [
    ([helper.make_node("Reshape", ["x", "s"], ["y"])], {"s": np.array([10**12, 10**6], _I)}, "(Reshape) cannot run"),
    ([helper.make_node("TopK", ["x", "k"], ["y", "i"])], {"k": np.array([10**12], _I)}, "(TopK) cannot run"),
    ([helper.make_node("Range", ["a", "b", "c"], ["y"])],
     {"a": np.array(0.0, np.float32), "b": np.array(np.inf, np.float32), "c": np.array(1.0, np.float32)},
     "finite bounds"),
    ([helper.make_node("Range", ["a", "b", "c"], ["y"])],
     {"a": np.array(0, _I), "b": np.array(5, _I), "c": np.array(0, _I)}, "a delta other than 0"),
    ([helper.make_node("Tile", ["x", "s"], ["y"])], {"s": np.array([-1, 1], _I)}, "non-negative count"),
    ([helper.make_node("ConstantOfShape", ["s"], ["y"])], {"s": np.array([-5], _I)}, "negative size"),
    ([helper.make_node("Gather", ["x", "i"], ["y"])], {"i": np.array([99], _I)}, "(Gather) cannot run"),
    ([helper.make_node("Slice", ["x", "a", "b", "c", "d"], ["y"])],
     {"a": np.array([0], _I), "b": np.array([2], _I), "c": np.array([1], _I), "d": np.array([0], _I)},
     "(Slice) cannot run"),
], ids=["reshape", "topk", "range inf", "range delta 0", "tile negative", "fill negative", "gather index",
        "slice step 0"])
def test_values_torch_refuses_are_one_line_naming_the_node(nodes: list[onnx.NodeProto], inits: dict[str, Any],
                                                           needle: str) -> None:
    # Before: torch's RuntimeError/IndexError, or ZeroDivisionError/OverflowError from Range, escaped as they were.
    net = ot.to_torch(_model(nodes, inits))
    with pytest.raises(onnxmorph.UsageError, match=r"^node 'y' .*" + needle.replace("(", r"\(").replace(")", r"\)")):
        net(torch.ones(2, 3))


def test_a_graph_that_cannot_run_is_refused_when_the_module_is_built() -> None:
    # The cases (a cycle, a missing input; before: KeyError at the first forward pass) and a sibling
    # (an output no node makes); an unsorted graph is no error: it runs in its topological order.
    cycle = _model([helper.make_node("Relu", ["b"], ["a"], name="ra"), helper.make_node("Relu", ["a"], ["b"]),
                    helper.make_node("Add", ["x", "a"], ["y"])], {})
    missing = _model([helper.make_node("Add", ["x", "nowhere"], ["y"])], {})
    no_output = _model([helper.make_node("Relu", ["x"], ["a"])], {})
    for model, needle in ((cycle, r"node 'ra' \(Relu\) and 2 other node\(s\) wait on each other's outputs"),
                          (missing, "reads 'nowhere', which no node"), (no_output, "graph output 'y' is made by no")):
        with pytest.raises(onnxmorph.UsageError, match=needle):
            ot.to_torch(model)
    unsorted = _model([helper.make_node("Tanh", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])], {})
    x = torch.linspace(-2, 2, 6).reshape(2, 3)
    torch.testing.assert_close(ot.to_torch(unsorted)(x), torch.tanh(torch.relu(x)), rtol=0, atol=0)


def test_fit_and_predict_refuse_arguments_and_targets_they_cannot_use() -> None:
    # Before: TypeError, ValueError, IndexError and torch's RuntimeError from deep inside the loop.
    net = ot.to_torch(onnxmorph.load(MODELS / "mlp_relu.onnx"))
    x, y = np.ones((8, 784), np.float32), np.arange(8) % 10
    cases = [
        (lambda: ot.predict(net, x, batch_size=0), "batch_size must be a whole number >= 1, got 0"),
        (lambda: ot.fit(net, x, y, steps=float("nan")), "steps must be a whole number >= 0, got nan"),
        (lambda: ot.fit(net, x, y, steps=1, batch_size=2.5), "batch_size must be a whole number >= 1, got 2.5"),
        (lambda: ot.fit(net, x, y, steps=1, seed=2**70), "seed must be below 2\\*\\*64"),
        (lambda: ot.fit(net, x, y + 100, steps=1), "loss 'cross_entropy' cannot compare .* Target 10[0-9] is out"),
        (lambda: ot.fit(net, np.array(["a"] * 8), y, steps=1), "numeric arrays"),
        (lambda: ot.fit(net, x, np.zeros((8, 3), np.float32), steps=1, loss="mse"), "mse needs targets shaped"),
        (lambda: ot.fit(net, x[:, :10], y, steps=1), "node 'fc1' \\(Gemm\\) cannot run on these inputs"),
        (lambda: ot.to_torch(5), "takes an onnx.ModelProto or a path, not int"),
    ]
    for call, needle in cases:
        with pytest.raises(onnxmorph.UsageError, match=needle):
            call()
    # mse's targets of one value per example are the output's shape ([N] for [N, 1]), not broadcast to N x N
    head = ot.to_torch(_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": np.ones((3, 1), np.float32)}))
    loss = ot.fit(head, np.ones((4, 3), np.float32), np.full(4, 3.0, np.float32), loss="mse", steps=1)
    assert loss == [0.0]


def test_to_torch_of_a_model_in_memory_gets_the_checks_load_makes() -> None:
    # Before: external data was read relative to the working folder, and dims the data did not make were
    # numpy's ValueError. Sibling: declared sizes over the limit, refused before any is allocated.
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": np.ones((3, 3), np.float32)})
    external = onnx.ModelProto()
    external.CopyFrom(model)
    onnx.external_data_helper.set_external_data(external.graph.initializer[0], "w.bin")
    external.graph.initializer[0].data_location = TensorProto.EXTERNAL
    external.graph.initializer[0].ClearField("raw_data")
    short = onnx.ModelProto()
    short.CopyFrom(model)
    short.graph.initializer[0].ClearField("raw_data")
    short.graph.initializer[0].float_data.extend([1.0, 2.0])
    huge = onnx.ModelProto()
    huge.CopyFrom(short)
    huge.graph.initializer[0].ClearField("dims")
    huge.graph.initializer[0].dims.extend([10**6, 10**6])
    for case, needle in ((external, "is in external data"), (short, "its data does not make its dims"),
                         (huge, limits.MODEL_BYTES.variable)):
        with pytest.raises(onnxmorph.OnnxMorphError, match=needle):
            ot.to_torch(case)


# =========================================================================== diff --shape

@pytest.mark.parametrize("dims", ["99999999999999999999x8x16", "100000000000000000x8x16"])
def test_diff_shape_beyond_what_onnx_counts_is_one_line(dims: str, tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    # Before: a size over int64 was an internal error in onnx's shape inference (exit 3). Sibling: two sizes that
    # fit int64 alone but not their product; and the same through --html, which writes nothing.
    parent = MODELS / "transformer_prenorm.onnx"
    child = tmp_path / "child.onnx"
    onnxmorph.save(onnxmorph.block(onnxmorph.load(parent), after=0), child)
    name = onnx.load(str(parent)).graph.input[0].name
    before = listing(tmp_path)
    assert_refused(run_main(["diff", parent, child, "--shape", f"{name}:{dims}"], capfd), 2, "elements, more than")
    assert_refused(run_main(["diff", parent, child, "--html", tmp_path / "d.html", "--shape", f"{name}:{dims}"],
                            capfd), 2, "2**63 - 1")
    assert listing(tmp_path) == before
