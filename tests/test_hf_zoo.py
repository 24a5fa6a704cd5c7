"""The zoo of tiny Hugging Face families (tests/hf_support.py): each export computes what the eager model computes,
each recorded export failure still fails, and `facts(kind)` describes the model that is built.

The TorchScript exports run by default (about a second each); the dynamo ones (7-10 s each) are marked slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hf_support import (
    ALL_KINDS,
    BAKES_ROUTING,
    EXPORT_FAILURES,
    KINDS,
    ZOO_KINDS,
    HFModel,
    build_hf_model,
    export,
    facts,
    hf_export,  # noqa: F401  (fixture)
    input_names,
    load_pretrained,
    output_name,
)

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

RTOL, ATOL = 1e-4, 1e-5


def _exporter(dynamo: bool) -> str:
    return "dynamo" if dynamo else "torchscript"


def _session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the CI machine has 2 cores shared with other jobs
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(hf: HFModel) -> dict[str, dict[str, np.ndarray]]:
    """Fresh inputs, none of them the tracing example (seed 0): two batches of 2, and one sequence of one token
    (of 4 audio frames), which an MoE block routes to only top_k experts; a trace that unrolled the loop over
    the experts its example reached fails on it."""
    return {"seed 1": hf.feed(seed=1), "seed 2": hf.feed(seed=2),
            "one token": hf.feed(seed=3, batch=1, sequence=4 if hf.kind == "wav2vec2" else 1)}


CASES = [pytest.param(kind, False, id=f"{kind}-torchscript") for kind in ALL_KINDS] + \
    [pytest.param(kind, True, id=f"{kind}-dynamo", marks=pytest.mark.slow) for kind in ALL_KINDS]


@pytest.mark.parametrize(("kind", "dynamo"), CASES)
def test_export_computes_what_the_eager_model_computes(hf_export, kind: str, dynamo: bool) -> None:  # noqa: F811
    hf = hf_export(kind, dynamo)
    session = _session(hf.path)
    assert [i.name for i in session.get_inputs()] == list(hf.input_names) == list(input_names(kind))
    assert [o.name for o in session.get_outputs()] == [hf.output_name] == [output_name(kind)]
    assert isinstance(hf.hf_model, hf.facts["model_class"]) and hf.config is hf.hf_model.config
    for name, feed in _feeds(hf).items():
        np.testing.assert_allclose(session.run(None, feed)[0], hf.logits(feed), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{hf.label} on {name}")


def _chain(error: BaseException | None) -> str:
    """The messages of an exception and of those it was raised from (the exporters wrap the root cause)."""
    texts = []
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


FAILURES = [pytest.param(kind, experts, dynamo, id=f"{kind}-{experts or 'zoo'}-{_exporter(dynamo)}",
                         marks=[pytest.mark.slow] if dynamo else [])
            for kind, experts, dynamo in EXPORT_FAILURES]


@pytest.mark.parametrize(("kind", "experts", "dynamo"), FAILURES)
def test_recorded_export_failures_still_fail(tmp_path: Path, kind: str, experts: str | None, dynamo: bool) -> None:
    reason = EXPORT_FAILURES[kind, experts, dynamo]
    try:
        hf = export(kind, dynamo, tmp_path, experts_implementation=experts)
    except Exception as error:  # noqa: BLE001  (any exporter error is a recorded failure or a new one)
        assert reason != BAKES_ROUTING and reason in _chain(error), _chain(error)[-2000:]
        return
    assert reason == BAKES_ROUTING, f"{kind} ({experts}) now exports with {_exporter(dynamo)}: update EXPORT_FAILURES"
    feed = _feeds(hf)["one token"]
    try:
        got = _session(hf.path).run(None, feed)[0]
    except Exception:  # noqa: BLE001  (onnxruntime rejects the baked split sizes: the failure recorded)
        return
    assert not np.allclose(got, hf.logits(feed), rtol=RTOL, atol=ATOL), \
        f"{kind} ({experts}) now routes a fresh token faithfully with {_exporter(dynamo)}: update EXPORT_FAILURES"


def test_kinds_keep_the_original_five_first() -> None:
    # Older test modules sweep KINDS; the zoo only adds.
    assert KINDS == ("bert", "gpt2", "llama", "vit", "wav2vec2")
    assert ALL_KINDS == KINDS + ZOO_KINDS and len(set(ALL_KINDS)) == len(ALL_KINDS)


# ---- facts(kind), measured on the built model -------------------------------------------------------------

_OUTPUT_PROJECTIONS = {"o_proj", "dense", "o", "c_proj", "out_proj"}
_QK_NORMS = {"q_norm", "k_norm", "q_layernorm", "k_layernorm"}


def _linears(module: Any) -> list[tuple[str, int, int, bool]]:
    """(name, in, out, has bias) of every projection under `module`; GPT-2's Conv1D stores its weight as (in, out)."""
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear):
            found.append((name, sub.in_features, sub.out_features, sub.bias is not None))
        elif type(sub).__name__ == "Conv1D":
            found.append((name, sub.weight.shape[0], sub.weight.shape[1], sub.bias is not None))
    return found


def _norms(module: Any) -> dict[str, Any]:
    """The norm layers under `module` (LayerNorm, the families' RMSNorms), not blocks named after their norms."""
    return {name: sub for name, sub in module.named_modules()
            if type(sub).__name__.endswith("Norm") and not list(sub.children()) and hasattr(sub, "weight")}


def _first_tensor(value: Any) -> Any:
    return value if isinstance(value, torch.Tensor) else next(v for v in value if isinstance(v, torch.Tensor))


def _same(a: Any, b: Any) -> bool:
    """Equal values (a windowed or flattened view of the same tensor counts as equal)."""
    return a is not None and b is not None and a.numel() == b.numel() and \
        torch.allclose(a.reshape(-1), b.reshape(-1), rtol=1e-5, atol=1e-6)


def _traced(model: Any, fact: dict[str, Any]) -> dict[str, Any]:
    """Inputs and outputs of the last block, its attention, its MLP and its norms on one forward pass."""
    block = model.get_submodule(fact["blocks"][-1])
    seen: dict[str, Any] = {}

    def keep(key: str) -> tuple[Any, Any]:
        def before(_module, args, kwargs):
            seen.setdefault(f"{key} in", args[0] if args else kwargs["hidden_states"])

        def after(_module, _args, output):
            seen.setdefault(f"{key} out", _first_tensor(output))

        return before, after

    parts = {"block": block, "attention": block.get_submodule(fact["attention"]),
             "mlp": block.get_submodule(fact["mlp"][0])}
    parts.update({f"norm {n}": m for n, m in _norms(block).items() if n.split(".")[-1] not in _QK_NORMS})
    handles = []
    for key, module in parts.items():
        before, after = keep(key)
        handles += [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]
    hf = HFModel(fact["kind"], False, Path(), None, input_names(fact["kind"]), 0.0)
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in hf.feed(seed=1).items()})
    for handle in handles:
        handle.remove()
    return seen


def _measured(kind: str) -> dict[str, Any]:
    """The facts as far as the HF model shows them: module shapes, buffers and one traced forward pass."""
    fact = facts(kind)
    model = build_hf_model(kind)
    hidden, heads, head_dim = fact["hidden_size"], fact["heads"], fact["head_dim"]
    blocks = [model.get_submodule(path) for path in fact["blocks"]]
    block = blocks[-1]
    attention = block.get_submodule(fact["attention"])
    projections = _linears(attention)
    outputs = [p for p in projections if p[0].split(".")[-1] in _OUTPUT_PROJECTIONS]
    inputs = [p for p in projections if p not in outputs]
    assert len(outputs) == 1 and outputs[0][1:3] == (heads * head_dim, hidden), projections
    qk = {n.split(".")[-1]: m.weight.shape[0] for n, m in _norms(attention).items() if n.split(".")[-1] in _QK_NORMS}
    norms = [m for n, m in _norms(block).items() if n.split(".")[-1] not in _QK_NORMS]
    got: dict[str, Any] = {
        "layers": len(blocks),
        # q, k and v together are (heads + 2 kv_heads) heads wide; the config names heads and kv_heads apart.
        "kv_heads": (sum(p[2] for p in inputs) // head_dim - heads) // 2,
        "qkv_bias": any(p[3] for p in inputs), "fused_qkv": len(inputs) == 1,
        "qk_norm": None if not qk else "per_head" if set(qk.values()) == {head_dim} else "full_width",
        "norms_per_block": len(norms),
        "norm": "layernorm" if all(isinstance(m, torch.nn.LayerNorm) for m in norms) else "rmsnorm",
    }
    with torch.no_grad():  # a zero weight zeroes a norm's output unless the norm scales by 1 + weight
        norm = norms[0]
        saved = [p.clone() for p in norm.parameters()]
        for param in norm.parameters():  # the weight and a LayerNorm's bias
            param.zero_()
        got["norm_plus_one"] = bool(norm(torch.randn(3, norm.weight.shape[0])).abs().max() > 0.1)
        for param, value in zip(norm.parameters(), saved):
            param.copy_(value)
    mlp = [block.get_submodule(path) for path in fact["mlp"]]
    experts = {n.split(".")[-1]: p.shape for m in mlp for n, p in m.named_parameters() if p.ndim == 3}
    routers = {1, experts["down_proj"][0]} if experts else set()  # the shared expert's gate and the router
    dense = [p for m in mlp for p in _linears(m) if p[2] not in routers]
    downs = [p[1] for p in dense if p[2] == hidden]
    ups = [p[2] for p in dense if p[1] == hidden]
    if experts:
        count, _, ffn = experts["down_proj"]
        got.update(experts=count, ffn_size=ffn, gated_mlp=experts["gate_up_proj"][1] == 2 * ffn,
                   fused_gate_up=True, shared_expert_ffn=downs[0] if downs else 0)
    else:
        (ffn,) = set(downs)
        got.update(experts=0, ffn_size=ffn, gated_mlp=sum(ups) == 2 * ffn, fused_gate_up=ups == [2 * ffn],
                   shared_expert_ffn=0)
    names = [n for n, _ in model.named_parameters()]
    rotary = {2 * b.numel() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    got["rotary_dim"] = rotary.pop() if rotary else None
    got["positions"] = "rotary" if got["rotary_dim"] else next(
        label for label, marks in (("learned", ("position_embeddings", "wpe", "embed_positions")),
                                   ("relative_bias", ("relative_attention_bias",)),
                                   ("window_bias", ("relative_position_bias_table",)), ("conv", ("pos_conv_embed",)))
        if any(mark in n for n in names for mark in marks))
    if fact["modality"] == "text":
        embedding = model.get_input_embeddings()
        ids = torch.arange(1, 6)
        with torch.no_grad():
            # nanmedian: a padding token's row is zero
            got["embedding_scale"] = float((embedding(ids) / embedding.weight[ids]).nanmedian())
        head = model.get_output_embeddings()
        got["tied_embeddings"] = head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
    else:
        got["embedding_scale"], got["tied_embeddings"] = None, False
    seen = _traced(model, fact)
    norm_io = [(seen.get(f"norm {n} in"), seen.get(f"norm {n} out")) for n in _norms(block)
               if n.split(".")[-1] not in _QK_NORMS]
    got["pre_norm"] = any(_same(i, seen["block in"]) and _same(o, seen["attention in"]) for i, o in norm_io)
    got["parallel"] = any(_same(i, seen["block in"]) and _same(o, seen["mlp in"]) for i, o in norm_io)
    got["post_sublayer_norm"] = any(_same(i, seen["attention out"]) for i, _ in norm_io)
    got["post_norm"] = any(_same(o, seen["block out"]) for _, o in norm_io)
    if experts:  # the experts' forward takes (hidden states, top-k expert ids, top-k weights)
        top_k = []
        handle = next(m for m in model.modules() if type(m).__name__.endswith("Experts")).register_forward_pre_hook(
            lambda _m, args: top_k.append(args[1].shape[-1]))
        with torch.no_grad():
            model(input_ids=torch.arange(1, 9)[None])
        handle.remove()
        got["top_k"] = top_k[0]
    else:
        got["top_k"] = 0
    return got


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_facts_are_what_the_built_model_shows(kind: str) -> None:
    fact = facts(kind)
    got = _measured(kind)
    assert got.pop("embedding_scale") == pytest.approx(fact["embedding_scale"], rel=1e-6)
    assert {k: fact[k] for k in got} == got


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_facts_agree_with_the_config(kind: str) -> None:
    fact = facts(kind)
    config = fact["config"]
    model = fact["model_class"](config)
    heads = config.num_attention_heads
    assert (config.hidden_size, heads[-1] if isinstance(heads, list) else heads) == (fact["hidden_size"], fact["heads"])
    assert getattr(config, "num_key_value_heads", fact["heads"]) == fact["kv_heads"]
    assert getattr(config, "head_dim", None) in (None, fact["head_dim"])
    # The switches some families have for the block layout.
    for switch, key in (("use_parallel_residual", "parallel"), ("parallel_attn", "parallel"),
                        ("do_layer_norm_before", "pre_norm"), ("do_stable_layer_norm", "pre_norm")):
        if hasattr(config, switch):
            assert getattr(config, switch) == fact[key], switch
    window = fact["sliding_window"]
    if window is None:
        assert getattr(config, "sliding_window", None) in (None, 0) or not getattr(config, "use_sliding_window", True)
    else:
        # Mistral has no layer types: every layer slides.
        assert config.sliding_window == window
        assert "sliding_attention" in getattr(config, "layer_types", ["sliding_attention"])
    assert getattr(config, "attn_logit_softcapping", None) == fact["attn_softcap"]
    assert getattr(config, "final_logit_softcapping", None) == fact["final_softcap"]
    assert getattr(config, "num_experts_per_tok", 0) == fact["top_k"]
    assert model.config._attn_implementation == fact["attn_implementation"]
    if fact["experts"]:
        assert model.config._experts_implementation == fact["experts_implementation"]
    heads_by_suffix = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm", "ForMaskedLM": "masked_lm",
                       "ForImageClassification": "image_classification", "ForCTC": "ctc"}
    name = fact["model_class"].__name__
    assert fact["head"] == next((head for suffix, head in heads_by_suffix.items() if name.endswith(suffix)), None)
    assert fact["output"] == output_name(kind)
    if "stages" in fact:  # swin: blocks, width and heads per stage
        widths = [config.embed_dim * 2 ** i for i in range(len(config.depths))]
        assert fact["stages"] == tuple(zip(config.depths, widths, config.num_heads))
        assert (fact["window_size"], sum(config.depths)) == (config.window_size, fact["layers"])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_a_saved_model_loads_back_with_the_zoo_implementations(tmp_path: Path, kind: str) -> None:
    # What an engineer does with a grown checkpoint: save_pretrained, then load it as the facts' class.
    fact = facts(kind)
    model = build_hf_model(kind)
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(kind, tmp_path)
    assert type(loaded) is fact["model_class"] and not loaded.training
    assert loaded.config._attn_implementation == fact["attn_implementation"]
    if fact["experts"]:
        assert loaded.config._experts_implementation == fact["experts_implementation"]
    hf = HFModel(kind, False, Path(), None, input_names(kind), 0.0)
    feed = {k: torch.from_numpy(v) for k, v in hf.feed(seed=1).items()}
    with torch.no_grad():
        want, got = (getattr(m(**feed), fact["output"]) for m in (model, loaded))
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
