"""The families sweep (`-m slow`): benchmarks/hf_widen_sweep.py on every family of tests/hf_support.py, both exporters.

Per family and exporter: inspect's blocks and heads equal the family's facts, `block --after` grows every block (a
post-norm one is refused), no widened child is wrong (written by a method but not verified: the analysis must
refuse instead), and at least the layers measured when the families work went in widen at 2x and 1.5x (the table
of docs/families.md, from `python benchmarks/hf_widen_sweep.py all --json ... --table ...`).
"""

from __future__ import annotations

import pytest
from hf_support import ALL_KINDS, hf_export  # noqa: F401  (fixture)
from test_widen_hf_coverage import _sweep_module  # benchmarks/hf_widen_sweep.py, loaded once

# (kind, exporter) -> (layers verified at 2x, at 1.5x, layers counted: their channels do not reach a graph output)
WIDEN = {
    ("bert", "torchscript"): (13, 8, 13), ("bert", "dynamo"): (13, 8, 13),
    ("gpt2", "torchscript"): (8, 8, 8), ("gpt2", "dynamo"): (8, 8, 8),
    ("llama", "torchscript"): (14, 14, 14), ("llama", "dynamo"): (14, 14, 14),
    ("vit", "torchscript"): (12, 12, 12), ("vit", "dynamo"): (12, 12, 12),
    ("wav2vec2", "torchscript"): (13, 8, 13), ("wav2vec2", "dynamo"): (13, 8, 13),
    ("opt", "torchscript"): (12, 12, 12), ("opt", "dynamo"): (12, 12, 12),
    ("gpt_neox", "torchscript"): (8, 8, 8), ("gpt_neox", "dynamo"): (8, 8, 8),
    ("gemma", "torchscript"): (14, 8, 14), ("gemma", "dynamo"): (14, 10, 14),
    ("gemma2", "torchscript"): (14, 14, 14), ("gemma2", "dynamo"): (14, 14, 14),
    ("gemma3", "torchscript"): (14, 14, 14), ("gemma3", "dynamo"): (14, 14, 14),
    ("qwen2", "torchscript"): (14, 14, 14), ("qwen2", "dynamo"): (14, 14, 14),
    ("qwen3", "torchscript"): (14, 14, 14), ("qwen3", "dynamo"): (14, 14, 14),
    ("mistral", "torchscript"): (14, 14, 14), ("mistral", "dynamo"): (14, 14, 14),
    ("phi", "torchscript"): (12, 12, 12), ("phi", "dynamo"): (12, 12, 12),
    ("phi3", "torchscript"): (8, 8, 8), ("phi3", "dynamo"): (8, 8, 8),
    ("falcon", "torchscript"): (8, 6, 8), ("falcon", "dynamo"): (8, 6, 8),
    ("olmo2", "torchscript"): (8, 8, 14), ("olmo2", "dynamo"): (8, 8, 14),
    ("t5", "torchscript"): (10, 10, 10), ("t5", "dynamo"): (10, 10, 10),
    ("swin", "torchscript"): (13, 13, 25), ("swin", "dynamo"): (16, 16, 25),
    ("mixtral", "torchscript"): (6, 6, 10), ("mixtral", "dynamo"): (6, 6, 10),
    ("qwen2_moe", "torchscript"): (10, 10, 18), ("qwen2_moe", "dynamo"): (10, 10, 18),
}
POST_NORM = {"bert"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_family_sweep(hf_export, kind: str, exporter: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    sweep = _sweep_module()
    path = hf_export(kind, exporter == "dynamo").path
    found = sweep.structure(kind, path)
    assert found["blocks"] == found["blocks_expected"], found
    assert found["heads_right"], found["heads"]
    assert found["grown"] == (0 if kind in POST_NORM else found["blocks"]), found["block_refusals"]
    layers = sweep.candidate_layers(path)
    verified, wrong = {}, []
    for factor in (2.0, 1.5):
        results = [sweep.widen_layer(path, name, old, factor) for name, old in layers]
        counted = [r for r in results if r["verified"] or not r["reaches_output"]]
        verified[factor] = sum(r["verified"] for r in counted)
        wrong += [f"{r['layer']} {factor}x: {w}" for r in results for w in r["wrong"]]
        with capsys.disabled():
            print(f"\n{kind} {exporter} {factor}x: {verified[factor]} of {len(counted)}")
    assert not wrong, wrong
    at_2x, at_15x, total = WIDEN[(kind, exporter)]
    assert len(counted) == total
    assert verified[2.0] >= at_2x and verified[1.5] >= at_15x, verified
