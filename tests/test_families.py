"""inspect and `block` on every family of the zoo (tests/hf_support.py), compared with what each family is (facts).

Default run: inspect on the TorchScript exports, `block` on the ones with a pattern of their own (a stream reshaped
around the MLP, parallel attention and MLP, norms after the sublayers with and without norms before, a mixture of
experts, windows and stages); `-m slow`: the rest and the dynamo exports. For each family inspect must list one
block per layer with its module path, parallel attention and MLP where the family has them, the experts of a
mixture of experts (its router is not attention), and per attention module the heads, head size and key/value
heads; `block --after` must grow every listed block (verified, default tolerances) except after a post-norm block,
refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hf_support import ALL_KINDS, hf_export  # noqa: F401  (fixture)

import onnxmorph

CASES = [(kind, False) for kind in ALL_KINDS] + [pytest.param(kind, True, marks=pytest.mark.slow) for kind in ALL_KINDS]
GROW_FAST = ("opt", "gpt_neox", "gemma2", "olmo2", "mixtral", "swin")
GROW_CASES = [(kind, False) if kind in GROW_FAST else pytest.param(kind, False, marks=pytest.mark.slow)
              for kind in ALL_KINDS] + [pytest.param(kind, True, marks=pytest.mark.slow) for kind in ALL_KINDS]


def _expected_blocks(fact: dict) -> list[dict]:
    """Per block: module, parallel, experts, top-k, heads, head size, key/value heads (Swin: per stage)."""
    stages = fact.get("stages") or ((fact["layers"], fact["hidden_size"], fact["heads"]),)
    per_block = [(heads, width // heads) for blocks, width, heads in stages for _ in range(blocks)]
    kv = fact["kv_heads"]
    return [{"module": f"model.{path}", "parallel": fact["parallel"], "experts": fact["experts"] or None,
             "top_k": fact["top_k"] or None, "attention": f"model.{path}.{fact['attention']}",
             "heads": (heads, head_dim, kv if len(stages) == 1 else heads)}
            for path, (heads, head_dim) in zip(fact["blocks"], per_block)]


def _kind(fact: dict) -> str:
    if fact["post_norm"]:
        return "post-norm"
    return "pre-norm" if fact["pre_norm"] else "sublayer-norm" if fact["post_sublayer_norm"] else "no-norm"


@pytest.mark.parametrize(("kind", "dynamo"), CASES, ids=lambda v: str(v))
def test_inspect_reads_blocks_heads_and_experts_as_the_family_has_them(hf_export, kind: str,  # noqa: F811
                                                                        dynamo: bool) -> None:
    hf = hf_export(kind, dynamo)
    fact = hf.facts
    info = onnxmorph.inspect(onnxmorph.load(hf.path))
    expected = _expected_blocks(fact)
    # (TorchScript names some models' nodes one scope short: OPT's "/model/decoder/layers.0/...")
    found = [{"module": b["module"] if b["module"] != e["module"].replace("model.", "", 1) else e["module"],
              "parallel": b["parallel"], "experts": b["experts"], "top_k": b["top_k"]}
             for b, e in zip(info["blocks"], expected)]
    assert len(info["blocks"]) == len(expected)
    assert found == [{k: e[k] for k in ("module", "parallel", "experts", "top_k")} for e in expected]
    assert {b["kind"] for b in info["blocks"]} == {_kind(fact)}
    heads = [(a["block"], a["module"] if a["module"] != e["attention"].replace("model.", "", 1) else e["attention"],
              (a["heads"], a["head_dim"], a["kv_heads"])) for a, e in zip(info["attention"], expected)]
    assert heads == [(k, e["attention"], e["heads"]) for k, e in enumerate(expected)]
    assert len(info["attention"]) == len(expected)
    layers = {layer["name"] for layer in info["layers"]}
    for a in info["attention"]:  # names that widen and deepen accept
        assert {a[role] for role in ("query", "key", "value", "output")} <= layers


def _outputs(model: onnx.ModelProto | str, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize(("kind", "dynamo"), GROW_CASES, ids=lambda v: str(v))
def test_a_block_grows_after_every_block(hf_export, kind: str, dynamo: bool) -> None:  # noqa: F811
    hf = hf_export(kind, dynamo)
    parent = onnxmorph.load(hf.path)
    blocks = onnxmorph.inspect(parent)["blocks"]
    assert blocks
    feed = hf.feed(seed=7, batch=2, sequence=5)
    expected = hf.logits(feed)
    for block in blocks:
        if block["kind"] == "post-norm":
            with pytest.raises(onnxmorph.NotApplicable, match="is post-norm"):
                onnxmorph.morph(parent, "block", after=block["after"])
            continue
        child, report = onnxmorph.morph(parent, "block", after=block["after"])
        assert report, report  # the default tolerances, no flags
        grown = onnxmorph.inspect(child)
        assert len(grown["blocks"]) == len(blocks) + 1 and len(grown["attention"]) == len(blocks) + 1
        # against the Hugging Face model itself, on inputs the verification did not draw
        np.testing.assert_allclose(_outputs(child, feed), expected, atol=1e-4, rtol=1e-4)
