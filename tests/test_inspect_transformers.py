"""inspect on exported transformers: blocks, attention modules, module paths, grouped refusals, complete JSON."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from hf_support import hf_export  # noqa: F401  (fixture)

import onnxmorph
from onnxmorph import cli
from onnxmorph.pipeline.inspection import format_inspection, reason_template

EXPECTED = {  # kind -> (block kind, heads, head_dim, kv_heads, query layer module)
    "gpt2": ("pre-norm", 4, 8, 4, "model.transformer.h.{}.attn.c_attn"),
    "llama": ("pre-norm", 4, 8, 2, "model.model.layers.{}.self_attn.q_proj"),
    "bert": ("post-norm", 4, 8, 4, "model.bert.encoder.layer.{}.attention.self.query"),
    "vit": ("pre-norm", 4, 8, 4, "model.vit.encoder.layer.{}.attention.attention.query"),
    "wav2vec2": ("pre-norm", 4, 8, 4, "model.wav2vec2.encoder.layers.{}.attention.q_proj"),
}
CASES = [(k, False) for k in EXPECTED if k != "wav2vec2"] + [("llama", True)] + [
    pytest.param(k, dynamo, marks=pytest.mark.slow)
    for k, dynamo in (("gpt2", True), ("bert", True), ("vit", True), ("wav2vec2", False), ("wav2vec2", True))]


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
def test_blocks_attention_and_modules_are_listed(hf_export, kind: str, dynamo: bool) -> None:  # noqa: F811
    hf = hf_export(kind, dynamo)
    info = onnxmorph.inspect(onnxmorph.load(hf.path))
    block_kind, heads, head_dim, kv_heads, q_module = EXPECTED[kind]
    assert [(b["after"], b["kind"]) for b in info["blocks"]] == [(0, block_kind), (1, block_kind)]
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert len(info["attention"]) == 2
    for k, attention in enumerate(info["attention"]):
        assert (attention["heads"], attention["head_dim"], attention["kv_heads"]) == (heads, head_dim, kv_heads)
        assert attention["block"] == k
        for role in ("layer", "query", "key", "value", "output"):
            assert attention[role] in layers  # names that widen and deepen accept
        if kind != "vit":  # ViT's module names differ between transformers versions
            assert layers[attention["query"]]["module"] == q_module.format(k)
    assert all(layer["module"] for layer in info["layers"])
    if block_kind == "pre-norm":
        for block in info["blocks"]:  # block accepts both the number and the module path
            for ref in (block["after"], block["module"]):
                onnxmorph.get_pass("block")(after=ref).requires(onnxmorph.load(hf.path))


def test_text_groups_repeated_refusals_and_json_is_complete(hf_export, capsys) -> None:  # noqa: F811
    hf = hf_export("gpt2", False)
    assert cli.main(["inspect", str(hf.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert cli.main(["inspect", str(hf.path)]) == 0
    text = capsys.readouterr().out
    reasons = [v["reason"] for layer in data["layers"] for v in layer["morphs"].values() if not v["applies"]]
    assert all(reasons)  # every refusal is in the JSON in full
    counts = Counter(reason_template(r) for r in reasons)
    for template, count in counts.items():
        if count > 1:  # printed once, with its count, each layer pointing at it
            assert len(re.findall(rf"\[R\d+\] {count} times: {re.escape(template)}\n", text)) == 1
    assert all(text.count(r) <= 1 for r in reasons if counts[reason_template(r)] > 1)
    assert "transformer blocks (2;" in text and "4 heads x 8" in text
    assert "module model.transformer.h.0.attn.c_attn" in text
    assert format_inspection(data, title="m").count("\n") == text.rstrip("\n").count("\n")
