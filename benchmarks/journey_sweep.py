"""Walk the README's journey on families no test was tuned on; tabulate what works, what is refused, what breaks.

    python benchmarks/journey_sweep.py                    # every family of tests/journey_zoo.py, both exporters
    python benchmarks/journey_sweep.py --quick            # the families marked quick
    python benchmarks/journey_sweep.py gptj bloom --exporter torchscript -v     # details per step
    python benchmarks/journey_sweep.py --json benchmarks/journey_results.json --markdown table.md

For each family and exporter (one subprocess each, so that a crash or hang in one leaves the others)
the model is built from a tiny config with random weights, exported as the README says (cache off,
a wrapper returning one tensor, dynamic batch and sequence), and walked through the commands, run
in-process through `onnxmorph.cli.main` exactly as typed:

  export     the parent's onnxruntime output equals the eager model's on fresh shapes ("unfaithful" if not:
             an exporter fault, and every later comparison with the eager model then uses the shapes that agree)
  inspect    blocks, attention modules (heads, key/value heads), FFNs (hidden width) or MoEs against the config
  block      `block --after i` on every listed block
  w.res 2x / 1.5x   `widen` of block 0's attention output projection (a residual-stream writer) to 2x and 1.5x
  w.ffn 2x / 1.5x   `widen` of block 0's FFN's first projection
  moe        `moe --layer 0 --experts 4 --top-k 2` (an existing MoE: `--experts 8 --top-k 4`)
  verify     `verify PARENT CHILD` with no flags, on the README's chain (block after the last block, then the
             residual writer widened 2x on that child; only the widen where block refuses)
  diff       `diff PARENT CHILD --html page.html` on the chain
  train      `to_torch` of parent and chain child: loss at step 0 equal (1e-5), then 4 Adam steps that are finite
  export-hf  `export-hf CHAIN --like PARENT_HF --parent PARENT.onnx` (Hugging Face families only)
  hf-load    `from_pretrained` of what export-hf wrote: its output equals the eager parent's

Outcomes: OK; refused (exit 2, the one line kept); FAIL (exit 1: a morph's child did not verify, nothing
written); WRONG (a child that was written, i.e. verified, whose onnxruntime output differs from the eager
model's on fresh inputs: the worst defect); CRASH (exit 3 or an exception); HANG (over --step-timeout);
MISREAD (inspect disagrees with the config); n/a. Every child written is compared with the eager model
(two fresh input sets of other batch and sequence sizes than verification's; atol 1e-4 + rtol 1e-3).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

STEPS = ("export", "inspect", "block", "w.res 2x", "w.res 1.5x", "w.ffn 2x", "w.ffn 1.5x", "moe", "verify", "diff",
         "train", "export-hf", "hf-load")
EXPORTERS = ("torchscript", "dynamo")
ATOL, RTOL = 1e-4, 1e-3


class StepTimeout(BaseException):
    """Raised by the alarm: a BaseException, so that the CLI's `except Exception` does not swallow it."""


def _alarm(signum: int, frame: Any) -> None:
    raise StepTimeout


def run_cli(argv: list[str], timeout: float) -> dict[str, Any]:
    """`python -m onnxmorph ARGV` in this process: exit code, stdout, stderr, seconds; HANG on timeout."""
    from onnxmorph import cli

    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except StepTimeout:
        code = "HANG"
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return {"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "seconds": round(time.perf_counter() - start, 2)}


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("onnxmorph: error: ") if lines else ""


def outcome_of(run: dict[str, Any]) -> tuple[str, str]:
    """(status, detail) of a CLI run by its exit code."""
    code = run["code"]
    if code == 0:
        return "OK", ""
    if code == "HANG":
        return "HANG", f"over {run['timeout']} s" if "timeout" in run else "timeout"
    if code == 1:
        return "FAIL", first_line(run["stderr"])
    if code == 2:
        return "refused", first_line(run["stderr"])
    return "CRASH", first_line(run["stderr"]) or f"exit {code}"


# --------------------------------------------------------------------------------------------- the worker


class Journey:
    """One family and exporter walked through every step; `results` is the row."""

    def __init__(self, family: str, exporter: str, work: Path, step_timeout: float, verbose: bool) -> None:
        self.family, self.exporter, self.step_timeout, self.verbose = family, exporter, step_timeout, verbose
        self.work = work / f"{family}_{exporter}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict[str, Any]] = {}
        self.built: Any = None
        self.good_feeds: list[dict] = []  # fresh inputs on which the parent's export equals the eager model
        self.stopped = False

    def record(self, step: str, status: str, detail: str = "", **extra: Any) -> None:
        previous = self.results.get(step)
        if previous and _rank(previous["status"]) >= _rank(status):
            previous.setdefault("more", []).append({"status": status, "detail": detail, **extra})
            return
        self.results[step] = {"status": status, "detail": detail, **extra}
        if previous:
            self.results[step].setdefault("more", []).append(previous)
        if self.verbose:
            print(f"  {self.family}/{self.exporter} {step}: {status} {detail}", file=sys.stderr, flush=True)

    def cli(self, argv: list[str]) -> dict[str, Any]:
        run = run_cli(argv, self.step_timeout)
        run["timeout"] = self.step_timeout
        if self.verbose:
            print(f"    $ onnxmorph {' '.join(argv)} -> {run['code']} ({run['seconds']} s) "
                  f"{first_line(run['stderr'])[:300]}", file=sys.stderr, flush=True)
        return run

    # -- the eager comparison

    def feeds(self) -> list[dict]:
        import journey_zoo as zoo

        spec = self.built.spec
        if spec.inputs.startswith("text") or spec.inputs == "audio_raw":
            feeds = [zoo.feed(spec, seed=11, batch=3, sequence=5), zoo.feed(spec, seed=12, batch=1, sequence=11)]
            if "attention_mask" in feeds[0]:  # padding, which verification's masks of ones never show
                padded = zoo.feed(spec, seed=13, batch=3, sequence=7)
                padded["attention_mask"][0, 4:] = 0
                padded["attention_mask"][2, 6:] = 0
                feeds.append(padded)
            return feeds
        return [zoo.feed(spec, seed=11, batch=3), zoo.feed(spec, seed=12, batch=1)]

    def against_eager(self, path: Path) -> tuple[bool, float, str]:
        """(equal, largest |difference|, note) of `path`'s onnxruntime output against the eager model's."""
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        worst, equal = 0.0, True
        for feed in self.good_feeds:
            got = session.run(None, feed)[0]
            want = self.built.eager(feed)
            if got.shape != want.shape:
                return False, float("inf"), f"shape {got.shape} != eager {want.shape}"
            diff = float(np.max(np.abs(got - want))) if got.size else 0.0
            worst = max(worst, diff)
            equal &= bool(np.allclose(got, want, atol=ATOL, rtol=RTOL))
        return equal, worst, f"{len(self.good_feeds)} input sets"

    def check_child(self, step: str, path: Path) -> None:
        """A written (verified) child must compute the eager model's function: WRONG otherwise."""
        if not self.good_feeds:
            self.record(step, "OK", "written; no input shape on which the export is faithful to compare with eager")
            return
        try:
            equal, worst, note = self.against_eager(path)
        except Exception as exc:  # noqa: BLE001 (a child onnxruntime cannot run at other shapes is wrong too)
            self.record(step, "WRONG", f"verified, but onnxruntime fails on fresh shapes: {_one(exc)}", child=str(path))
            return
        if equal:
            self.record(step, "OK", f"max |child - eager| {worst:.1e}", child=str(path))
        else:
            self.record(step, "WRONG", f"verified, but max |child - eager| = {worst:.3g} on fresh inputs ({note})",
                        child=str(path))

    def morph(self, step: str, argv: list[str], out: Path) -> bool:
        run = self.cli([*argv, "-o", str(out)])
        status, detail = outcome_of(run)
        if status == "OK":
            if not out.is_file():
                self.record(step, "CRASH", "exit 0 but no file written")
                return False
            self.check_child(step, out)
            return self.results[step]["status"] == "OK"
        if out.exists():
            self.record(step, "CRASH", f"{status} ({detail}) but a file was left behind")
        self.record(step, status, detail)
        return False

    # -- the steps

    def run(self) -> dict[str, Any]:
        steps = [self.step_export, self.step_inspect, self.step_block, self.step_widen, self.step_moe,
                 self.step_chain, self.step_train, self.step_export_hf]
        for step in steps:
            if self.stopped:
                break
            try:
                step()
            except StepTimeout:
                self.record(step.__name__.removeprefix("step_"), "HANG", f"over {self.step_timeout} s")
            except Skip as skip:
                self.stopped = "inspect" in skip.steps  # nothing after it can run
                for name in skip.steps:
                    if name not in self.results:
                        self.record(name, "n/a", str(skip))
            except Exception as exc:  # noqa: BLE001 (the sweep's own step failed: a crash of what it called)
                name = step.__name__.removeprefix("step_")
                self.record(name, "CRASH", _one(exc), traceback=traceback.format_exc()[-3000:])
        return {"family": self.family, "exporter": self.exporter, "steps": self.results}

    def step_export(self) -> None:
        import journey_zoo as zoo
        import numpy as np
        import onnxruntime as ort

        module, hf_model = zoo.build(self.family)
        self.hf_folder = None
        if hf_model is not None:
            self.hf_folder = self.work / "parent_hf"
            if not (self.hf_folder / "config.json").is_file():
                hf_model.save_pretrained(str(self.hf_folder))
        try:
            with _alarm_for(self.step_timeout):
                self.built = zoo.export(self.family, self.exporter == "dynamo", self.work, module, hf_model)
        except StepTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 (the exporter's fault, not onnxmorph's)
            self.record("export", "n/a", f"the exporter fails: {_one(exc)}")
            raise Skip(STEPS, "no export") from exc
        self.parent = self.built.path
        # the folder export-hf reads also holds the export (its digest finds it)
        session = ort.InferenceSession(str(self.parent), providers=["CPUExecutionProvider"])
        notes = []
        for feed in self.feeds():
            try:
                got = session.run(None, feed)[0]
                want = self.built.eager(feed)
                if got.shape == want.shape and np.allclose(got, want, atol=ATOL, rtol=RTOL):
                    self.good_feeds.append(feed)
                else:
                    notes.append(f"max |ort - eager| {float(np.max(np.abs(got - want))):.3g}")
            except Exception as exc:  # noqa: BLE001
                notes.append(f"onnxruntime fails on {[v.shape for v in feed.values()]}: {_one(exc)[:160]}")
        if notes:
            self.record("export", "unfaithful", "; ".join(notes), seconds=round(self.built.seconds, 1))
        else:
            self.record("export", "OK", f"{self.built.seconds:.1f} s", seconds=round(self.built.seconds, 1))

    def step_inspect(self) -> None:
        run = self.cli(["inspect", str(self.parent), "--json"])
        status, detail = outcome_of(run)
        if status != "OK":
            self.record("inspect", status, detail)
            raise Skip(STEPS[2:], "inspect failed")
        self.info = json.loads(run["stdout"])
        spec = self.built.spec
        blocks, attention = self.info["blocks"], self.info["attention"]
        ffns, moes = self.info["experts"]["ffns"], self.info["experts"]["moes"]
        heads = sorted({str(a["heads"]) for a in attention})
        kv_heads = sorted({str(a["kv_heads"]) for a in attention})
        found = (f"{len(blocks)} blocks, {len(attention)} attention"
                 + (f" (heads {'/'.join(heads)}, kv {'/'.join(kv_heads)})" if attention else "")
                 + f", {len(ffns)} FFNs" + (f" (hidden {sorted({f['hidden'] for f in ffns})})" if ffns else "")
                 + (f", {len(moes)} MoEs (E {sorted({m['experts'] for m in moes})}, "
                    f"k {sorted({m['top_k'] for m in moes})})" if moes else ""))
        misread = []
        if spec.layers is not None and len(blocks) != spec.layers:
            misread.append(f"blocks {len(blocks)}/{spec.layers}")
        if spec.heads is not None:
            if len(attention) != (spec.layers or len(attention) or 1):
                misread.append(f"attention modules {len(attention)}/{spec.layers}")
            wrong = [a for a in attention if a["heads"] != spec.heads or a["kv_heads"] != spec.kv_heads]
            if wrong:
                misread.append(f"heads/kv {wrong[0]['heads']}/{wrong[0]['kv_heads']} != "
                               f"{spec.heads}/{spec.kv_heads}")
        if spec.experts:
            if len(moes) != spec.layers:
                misread.append(f"MoEs {len(moes)}/{spec.layers}")
            if any(m["experts"] != spec.experts or m["top_k"] != spec.top_k for m in moes):
                misread.append(f"MoE E/k {[(m['experts'], m['top_k']) for m in moes]} != {spec.experts}/{spec.top_k}")
        elif spec.ffn is not None:
            if len(ffns) != spec.layers:
                misread.append(f"FFNs {len(ffns)}/{spec.layers}")
            if any(f["hidden"] != spec.ffn for f in ffns):
                misread.append(f"FFN hidden {sorted({f['hidden'] for f in ffns})} != {spec.ffn}")
        if misread:
            self.record("inspect", "MISREAD", "; ".join(misread) + f" (found {found})")
        else:
            self.record("inspect", "OK", found)

    def _layers(self) -> dict[str, tuple[str, int] | None]:
        """The residual writer and the FFN's first projection of block 0 (name, output width), as inspect names them."""
        info = self.info
        layers = {layer["name"]: layer for layer in info["layers"]}

        def width(name: str) -> int:
            layer = layers[name]
            shape = layer["weight_shape"]
            if layer["op"] == "Conv":
                return shape[0]
            if layer["op"] == "Gemm":
                return shape[0] if self._trans_b(name) else shape[1]
            return shape[-1]

        writer = ffn = None
        attention = [a for a in info["attention"] if a.get("block", 0) == 0] or info["attention"]
        ffns = info["experts"]["ffns"]
        if attention:
            writer = attention[0]["output"]
        elif ffns:
            writer = ffns[0]["down"]
        if ffns:
            ffn = ffns[0]["inner"][0]
        if not attention and (writer is None or ffn is None):  # a CNN or an MLP: the first two layers inspect lists
            convs = [name for name, layer in layers.items() if layer["op"] in ("Conv", "Gemm", "MatMul")]
            writer = writer or (convs[0] if convs else None)
            ffn = ffn or (convs[1] if len(convs) > 1 else None)
        return {"res": (writer, width(writer)) if writer else None, "ffn": (ffn, width(ffn)) if ffn else None}

    def _trans_b(self, name: str) -> bool:
        import onnx

        if not hasattr(self, "_model"):
            self._model = onnx.load(str(self.parent), load_external_data=False)
        node = next(n for n in self._model.graph.node if n.name == name or name in n.output)
        return any(a.name == "transB" and a.i for a in node.attribute)

    def step_block(self) -> None:
        blocks = self.info["blocks"]
        self.block_children: dict[int, Path] = {}
        indices = [b["after"] for b in blocks] or [0]
        statuses = []
        for index in indices:
            out = self.work / f"block{index}.onnx"
            out.unlink(missing_ok=True)
            run = self.cli(["block", str(self.parent), "--after", str(index), "-o", str(out)])
            status, detail = outcome_of(run)
            if status == "OK":
                sub = f"block{index}"
                self.check_child(sub, out)
                status, detail = self.results[sub]["status"], self.results.pop(sub)["detail"]
                if status == "OK":
                    self.block_children[index] = out
            statuses.append((index, status, detail))
        if not blocks:
            status, detail = statuses[0][1], statuses[0][2]
            self.record("block", status if status != "OK" else "OK", f"no block listed; --after 0: {detail}")
            return
        worst = max(statuses, key=lambda s: _rank(s[1]))
        ok = sum(1 for s in statuses if s[1] == "OK")
        detail = f"{ok}/{len(statuses)}" + ("" if worst[1] == "OK" else f"; after {worst[0]}: {worst[2]}")
        self.record("block", worst[1] if worst[1] != "OK" else "OK", detail)

    def step_widen(self) -> None:
        targets = self._layers()
        self.widen_children: dict[str, Path] = {}
        for which in ("res", "ffn"):
            for factor in (2.0, 1.5):
                step = f"w.{which} {factor:g}x"
                if targets[which] is None:
                    self.record(step, "n/a", "inspect lists no dense FFN" if which == "ffn" else "no layer")
                    continue
                layer, old = targets[which]
                width = int(round(old * factor))
                refusals = []
                for method in ("net2net", "lemon", "netmorph"):
                    out = self.work / f"widen_{which}_{factor:g}_{method}.onnx"
                    out.unlink(missing_ok=True)
                    run = self.cli(["widen", str(self.parent), "--layer", layer, "--width", str(width),
                                    "--method", method, "-o", str(out)])
                    status, detail = outcome_of(run)
                    if status == "OK":
                        self.check_child(step, out)
                        if self.results[step]["status"] == "OK":
                            self.results[step]["detail"] = (f"{method} {layer} {old}->{width}; "
                                                            + self.results[step]["detail"])
                            self.widen_children[step] = out
                        break
                    refusals.append((method, status, detail))
                    if status in ("CRASH", "HANG", "FAIL"):
                        self.record(step, status, f"{method} {layer} {old}->{width}: {detail}")
                if step not in self.results:
                    reasons: dict[str, list[str]] = {}
                    for method, _, detail in refusals:
                        reasons.setdefault(detail, []).append(method)
                    text = "; ".join(d if len(reasons) == 1 else f"{'/'.join(m)}: {d}" for d, m in reasons.items())
                    self.record(step, refusals[0][1], text, request=f"{layer} {old}->{width}")

    def step_moe(self) -> None:
        out = self.work / "moe.onnx"
        out.unlink(missing_ok=True)
        grow = bool(self.info["experts"]["moes"])
        argv = ["moe", str(self.parent), "--layer", "0", "--experts", "8" if grow else "4",
                "--top-k", "4" if grow else "2"]
        self.morph("moe", argv, out)

    def step_chain(self) -> None:
        """The README's chain: block after the last block, then the residual writer widened 2x on that child."""
        self.chain = None
        blocks = getattr(self, "block_children", {})
        targets = self._layers()
        source = blocks[max(blocks)] if blocks else self.parent
        if targets["res"] is not None:
            layer, old = targets["res"]
            out = self.work / "chain.onnx"
            out.unlink(missing_ok=True)
            run = self.cli(["widen", str(source), "--layer", layer, "--width", str(2 * old), "--method", "net2net",
                            "-o", str(out)])
            if run["code"] == 0 and out.is_file():
                self.chain = out
                self.chain_label = ("block + " if blocks else "") + "widen res 2x"
        if self.chain is None and blocks:
            self.chain, self.chain_label = blocks[max(blocks)], "block"
        if self.chain is None and self.widen_children:
            self.chain_label, self.chain = next(iter(self.widen_children.items()))
        if self.chain is None:
            raise Skip(("verify", "diff", "train", "export-hf", "hf-load"), "no child to take further")
        run = self.cli(["verify", str(self.parent), str(self.chain)])
        status, detail = outcome_of(run)
        self.record("verify", status, f"{self.chain_label}: {detail or 'PASS'}")
        if status == "OK":
            self.check_child("verify", self.chain)
            self.results["verify"]["detail"] = f"{self.chain_label}; " + self.results["verify"]["detail"]
        page = self.work / "diff.html"
        page.unlink(missing_ok=True)
        run = self.cli(["diff", str(self.parent), str(self.chain), "--html", str(page)])
        status, detail = outcome_of(run)
        if status == "OK" and (not page.is_file() or page.stat().st_size < 1000):
            status, detail = "CRASH", "exit 0 but no page"
        self.record("diff", status, detail or f"{page.stat().st_size // 1024} kB page")

    def step_train(self) -> None:
        import journey_zoo as zoo
        import numpy as np
        import torch

        import onnxmorph
        import onnxmorph.train as ot

        if getattr(self, "chain", None) is None:
            raise Skip(("train",), "no child")
        spec = self.built.spec
        batch = zoo.feed(spec, seed=5, batch=8)
        rng = np.random.default_rng(5)
        with _alarm_for(self.step_timeout):
            try:
                parent = ot.to_torch(onnxmorph.load(str(self.parent)))
                child = ot.to_torch(onnxmorph.load(str(self.chain)))
            except onnxmorph.OnnxMorphError as exc:
                self.record("train", "refused", _one(exc))
                return
            out = ot.predict(parent, batch)
            targets = None
            if spec.loss == "token_cross_entropy":
                targets = rng.integers(0, out.shape[-1], out.shape[:-1]).astype(np.int64)
            elif spec.loss == "cross_entropy":
                targets = rng.integers(0, out.shape[1], out.shape[0]).astype(np.int64)
            elif spec.loss == "mse":
                targets = rng.standard_normal(out.shape).astype(np.float32)

            def frozen(params):
                return torch.optim.SGD(params, lr=0.0)

            base = ot.fit(parent, batch, targets, loss=spec.loss, steps=1, batch_size=8, optimizer=frozen)
            losses = ot.fit(child, batch, targets, loss=spec.loss, steps=4, batch_size=8,
                            optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
        gap = abs(losses[0] - base[0])
        detail = f"step-0 loss {losses[0]:.5f} vs parent {base[0]:.5f} (|diff| {gap:.1e}); 4 steps -> {losses[-1]:.5f}"
        if gap > 1e-5 * max(1.0, abs(base[0])) or not all(np.isfinite(losses)):
            self.record("train", "WRONG", detail)
        else:
            self.record("train", "OK", detail)

    def step_export_hf(self) -> None:
        import numpy as np
        import torch

        if getattr(self, "chain", None) is None:
            raise Skip(("export-hf", "hf-load"), "no child")
        if self.built.hf_model is None:
            raise Skip(("export-hf", "hf-load"), "plain PyTorch: no Hugging Face checkpoint")
        out = self.work / "child_hf"
        run = self.cli(["export-hf", str(self.chain), "--like", str(self.hf_folder), "--parent", str(self.parent),
                        "-o", str(out), "--force"])
        status, detail = outcome_of(run)
        self.record("export-hf", status, detail or first_line(run["stdout"].splitlines()[0] if run["stdout"] else ""))
        if status != "OK":
            raise Skip(("hf-load",), "export-hf did not write")
        hf = self.built.hf_model
        kwargs = {}
        attn = getattr(hf.config, "_attn_implementation", None)
        if attn:
            kwargs["attn_implementation"] = attn
        if getattr(hf.config, "_experts_implementation", None):
            kwargs["experts_implementation"] = hf.config._experts_implementation
        with _alarm_for(self.step_timeout):
            grown = type(hf).from_pretrained(str(out), **kwargs).eval()
            wrapper = type(self.built.module)
            module = self.built.module
            import copy

            clone = copy.copy(module)
            clone.model = grown
            worst = 0.0
            for feed in self.good_feeds:
                args = [torch.from_numpy(feed[n]) for n in _names(self.built.spec)]
                with torch.no_grad():
                    got = clone(*args).numpy()
                want = self.built.eager(feed)
                worst = max(worst, float(np.max(np.abs(got - want))))
                if got.shape != want.shape or not np.allclose(got, want, atol=ATOL, rtol=RTOL):
                    self.record("hf-load", "WRONG", f"from_pretrained computes another function: max |diff| "
                                f"{worst:.3g} ({wrapper.__name__})")
                    return
        self.record("hf-load", "OK", f"max |grown HF - parent eager| {worst:.1e}")


class Skip(Exception):
    def __init__(self, steps: tuple[str, ...], why: str) -> None:
        super().__init__(why)
        self.steps = steps


@contextlib.contextmanager
def _alarm_for(seconds: float):
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _names(spec: Any) -> tuple[str, ...]:
    import journey_zoo as zoo

    return zoo.input_names(spec)


def _one(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:400]


_RANKS = {"n/a": 0, "OK": 1, "unfaithful": 2, "refused": 2, "MISREAD": 3, "FAIL": 4, "HANG": 5, "CRASH": 6, "WRONG": 7}


def _rank(status: str) -> int:
    return _RANKS.get(status, 6)


# ---------------------------------------------------------------------------------------------- the driver


def worker(family: str, exporter: str, work: Path, out: Path, step_timeout: float, verbose: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    warnings.simplefilter("ignore")
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # a parent that fails to run is reported in the row, not logged
    start = time.perf_counter()
    row = Journey(family, exporter, work, step_timeout, verbose).run()
    row["seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(row, indent=1, default=str))


def _cell(status: str) -> str:
    return {"OK": "OK", "n/a": "n/a"}.get(status, status)


def markdown(rows: list[dict]) -> str:
    """The table, one row per family and exporter, with numbered reasons below it."""
    reasons: dict[str, int] = {}
    lines = ["| family | exporter | " + " | ".join(STEPS) + " |", "|---|---|" + "---|" * len(STEPS)]
    for row in rows:
        cells = []
        for step in STEPS:
            result = row["steps"].get(step, {"status": "n/a", "detail": ""})
            status, detail = result["status"], result.get("detail", "")
            cell = _cell(status)
            if step == "block" and status in ("OK",):
                cell = f"OK {detail.split(';')[0]}"
            if status not in ("OK", "n/a") or (status == "n/a" and detail and step == "export"):
                key = _reason_key(status, detail)
                number = reasons.setdefault(key, len(reasons) + 1)
                cell = f"{cell} [{number}]"
            cells.append(cell)
        lines.append(f"| {row['family']} | {row['exporter']} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, number in reasons.items():
        lines.append(f"{number}. {key}")
    return "\n".join(lines)


def _reason_key(status: str, detail: str) -> str:
    """A reason with the numbers that differ between models blanked, so that equal reasons share a footnote."""
    text = re.sub(r"\s+", " ", detail).strip()
    text = re.sub(r"(?:/[\w.+-]+)+/([\w.+-]+)", r"\1", text)  # paths differ per family: keep the file name
    return f"{status}: {text}" if text else status


def main(argv: list[str] | None = None) -> int:
    import journey_zoo as zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", help="families of tests/journey_zoo.py (default: all)")
    parser.add_argument("--quick", action="store_true", help="only the families marked quick")
    parser.add_argument("--exporter", choices=(*EXPORTERS, "both"), default="both")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "onnxmorph-journey")
    parser.add_argument("--step-timeout", type=float, default=300.0)
    parser.add_argument("--jobs", type=int, default=1, help="families run at once (default 1: the machine is shared)")
    parser.add_argument("--json", type=Path, help="write every row (with details) here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("-v", "--verbose", action="store_true", help="every step's command and outcome")
    parser.add_argument("--worker", nargs=3, metavar=("FAMILY", "EXPORTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], args.work, Path(args.worker[2]), args.step_timeout, args.verbose)
        return 0
    families = args.families or [n for n, s in zoo.FAMILIES.items() if s.quick or not args.quick]
    unknown = [f for f in families if f not in zoo.FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(zoo.FAMILIES)}")
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(f, e) for f in families for e in exporters]
    rows: list[dict] = []
    running: list[tuple[subprocess.Popen, str, str, Path, float]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    total = len(STEPS) * args.step_timeout + 120
    while jobs or running:
        while jobs and len(running) < max(1, args.jobs):
            family, exporter = jobs.pop(0)
            out = args.work / f"{family}_{exporter}.json"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(args.work), "--step-timeout",
                   str(args.step_timeout), "--worker", family, exporter, str(out)] + (["-v"] if args.verbose else [])
            running.append((subprocess.Popen(cmd, env=env), family, exporter, out, time.perf_counter()))
        time.sleep(0.5)
        for item in list(running):
            proc, family, exporter, out, started = item
            if proc.poll() is None and time.perf_counter() - started < total:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove(item)
            if out.is_file():
                row = json.loads(out.read_text())
            else:
                row = {"family": family, "exporter": exporter,
                       "steps": {"export": {"status": "CRASH", "detail": f"worker exit {proc.returncode}"}}}
            rows.append(row)
            summary = " ".join(f"{s}={row['steps'].get(s, {}).get('status', '-')}" for s in STEPS)
            print(f"{family:16s} {exporter:11s} {row.get('seconds', 0):6.1f} s  {summary}", flush=True)
    order = {(f, e): k for k, (f, e) in enumerate((f, e) for f in families for e in exporters)}
    rows.sort(key=lambda r: order[r["family"], r["exporter"]])
    table = markdown(rows)
    print()
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    worst = max((_rank(s["status"]) for r in rows for s in r["steps"].values()), default=0)
    return 1 if worst >= _rank("FAIL") else 0


if __name__ == "__main__":
    sys.exit(main())
