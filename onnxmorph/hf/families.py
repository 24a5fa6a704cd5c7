"""The Hugging Face families export-hf writes: each one's config keys and the shape of every parameter in its sizes.

A family is read from `config.json`'s `model_type`. Its parameter shapes are written in symbols:
D (hidden_size), I (intermediate_size), Q (query width: heads x head_dim), KV (key/value width:
key/value heads x head_dim), hd (head_dim). Those are what growth may change, and the child's sizes
are solved from its tensors (each tensor says what D, I, Q or KV it was made for, and they must all
agree: one config holds one of each). Any other symbol (V vocabulary, P positions, T token types,
C labels) names a size that growth keeps. A parameter that no rule names must keep its shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from onnxmorph.errors import NotApplicable, UsageError

GROWN = ("D", "I", "Q", "KV")  # the sizes solved from the child's tensors, in this order


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture keeps its sizes (config keys) and parameters (names and shapes)."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # the module path of the list of blocks: "model.layers" holds "model.layers.0.", ...
    embed: str  # the token embedding, [V, D]
    shapes: Mapping[str, str]  # parameter outside the blocks -> shape ("V,D")
    layer_shapes: Mapping[str, str]  # parameter inside block N, the name after "layers.N." -> shape
    hidden: str  # config keys
    ffn: str
    heads: str
    num_layers: str
    kv_heads: str | None = None  # None: as many key/value heads as heads
    head_dim: str | None = None  # None: the family derives head_dim = hidden / heads
    eps: tuple[str, ...] = ()  # the config keys of the norms' epsilon (none: fixed in transformers' code)
    tied: Mapping[str, str] = field(default_factory=dict)  # with tie_word_embeddings: target -> source parameter
    embed_scale: bool = False  # the embeddings are multiplied by sqrt(hidden_size) (Gemma)
    attention: str = "separate"  # how a block keeps q, k, v and the output projection (for padding heads)
    projections: tuple[str, ...] = ()  # for padding: the q/k/v (or fused) projection and the output projection
    same_width: tuple[str, ...] = ()  # config keys that always equal hidden_size in this family
    # transformers' config refuses a hidden_size that is not a multiple of num_attention_heads (its validator), even
    # where head_dim is its own key
    heads_divide_hidden: bool = False

    def shape_rule(self, key: str) -> str | None:
        """The shape rule of parameter `key`, or None when the family names no rule for it."""
        if key in self.shapes:
            return self.shapes[key]
        match = self.layer_match(key)
        return self.layer_shapes.get(match[1]) if match else None

    def layer_match(self, key: str) -> tuple[int, str] | None:
        """(block index, the name inside the block) for a parameter of a block, else None."""
        match = re.fullmatch(re.escape(self.layers) + r"\.(\d+)\.(.+)", key)
        return (int(match[1]), match[2]) if match else None

    def layer_key(self, index: int, rest: str) -> str:
        return f"{self.layers}.{index}.{rest}"


def _both(*names: str, shape: str) -> dict[str, str]:
    """`name.weight` and `name.bias` of each name, all of one shape (norms, biases)."""
    return {f"{n}.{p}": shape for n in names for p in ("weight", "bias")}


def _linear(name: str, out: str, inp: str, bias: bool = True) -> dict[str, str]:
    """A torch.nn.Linear: weight [out, in] and bias [out]."""
    rules = {f"{name}.weight": f"{out},{inp}"}
    if bias:
        rules[f"{name}.bias"] = out
    return rules


_LLAMA_LAYER = {
    **_both("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", shape="D"),
    **_linear("self_attn.q_proj", "Q", "D"), **_linear("self_attn.k_proj", "KV", "D"),
    **_linear("self_attn.v_proj", "KV", "D"), **_linear("self_attn.o_proj", "D", "Q"),
    "self_attn.q_norm.weight": "hd", "self_attn.k_norm.weight": "hd",
    **_linear("mlp.gate_proj", "I", "D"), **_linear("mlp.up_proj", "I", "D"), **_linear("mlp.down_proj", "D", "I"),
}
_LLAMA_KEYS = {"hidden": "hidden_size", "ffn": "intermediate_size", "heads": "num_attention_heads",
               "num_layers": "num_hidden_layers", "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
               "eps": ("rms_norm_eps",)}
_LLAMA_TOP = {"model.embed_tokens.weight": "V,D", "model.norm.weight": "D", "lm_head.weight": "V,D"}
_LLAMA_TIED = {"lm_head.weight": "model.embed_tokens.weight"}


def _llama_like(name: str, *model_types: str, **extra: Any) -> Family:
    return Family(name=name, model_types=model_types or (name,), layers="model.layers",
                  embed="model.embed_tokens.weight", shapes=_LLAMA_TOP, layer_shapes=_LLAMA_LAYER,
                  tied=_LLAMA_TIED, projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "self_attn.o_proj"), **{**_LLAMA_KEYS, **extra})


# StableLM and StarCoder2: Llama's layout with LayerNorms (a shift beside the gain) and biases; StarCoder2's MLP
# is c_fc -> GELU -> c_proj.
_LAYERNORM_TOP = {**_LLAMA_TOP, "model.norm.bias": "D"}
_STARCODER2_LAYER = {**{k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")},
                     **_linear("mlp.c_fc", "I", "D"), **_linear("mlp.c_proj", "D", "I")}


def _bert_like(name: str, prefix: str, head: Mapping[str, str], tied: Mapping[str, str]) -> Family:
    """BERT's encoder under `prefix` ("bert", "roberta"), with the task heads `head` outside it."""
    return Family(
        name=name, model_types=(name,), layers=f"{prefix}.encoder.layer",
        embed=f"{prefix}.embeddings.word_embeddings.weight",
        shapes={f"{prefix}.embeddings.word_embeddings.weight": "V,D", f"{prefix}.embeddings.position_embeddings.weight":
                "P,D", f"{prefix}.embeddings.token_type_embeddings.weight": "T,D",
                **_both(f"{prefix}.embeddings.LayerNorm", shape="D"), **_linear(f"{prefix}.pooler.dense", "D", "D"),
                **head},
        layer_shapes={**_linear("attention.self.query", "Q", "D"), **_linear("attention.self.key", "Q", "D"),
                      **_linear("attention.self.value", "Q", "D"), **_linear("attention.output.dense", "D", "Q"),
                      **_both("attention.output.LayerNorm", "output.LayerNorm", shape="D"),
                      **_linear("intermediate.dense", "I", "D"), **_linear("output.dense", "D", "I")},
        hidden="hidden_size", ffn="intermediate_size", heads="num_attention_heads", num_layers="num_hidden_layers",
        eps=("layer_norm_eps",), tied=tied,
        projections=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"))


FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", heads_divide_hidden=True), _llama_like("mistral"), _llama_like("qwen2"), _llama_like("qwen3"),
    # Gemma scales by 1 + weight in its norms (the exporters fold the 1 in: matched as "plus one") and multiplies
    # the embeddings by sqrt(hidden_size), which the config derives.
    _llama_like("gemma", embed_scale=True), _llama_like("gemma2", embed_scale=True, heads_divide_hidden=True),
    _llama_like("gemma3", "gemma3_text", embed_scale=True, heads_divide_hidden=True),
    # Granite: Llama with scalar multipliers (embeddings, residuals, attention scores, logits) that width keeps.
    _llama_like("granite"),
    # StableLM's attention derives head_dim as hidden / heads, whatever the config says.
    Family(name="stablelm", model_types=("stablelm",), layers="model.layers", embed="model.embed_tokens.weight",
           shapes=_LAYERNORM_TOP, layer_shapes=_LLAMA_LAYER, tied=_LLAMA_TIED,
           projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
           **{**_LLAMA_KEYS, "eps": ("layer_norm_eps",), "head_dim": None}),
    Family(name="starcoder2", model_types=("starcoder2",), layers="model.layers", embed="model.embed_tokens.weight",
           shapes=_LAYERNORM_TOP, layer_shapes=_STARCODER2_LAYER, tied=_LLAMA_TIED,
           projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
           **{**_LLAMA_KEYS, "eps": ("norm_epsilon",)}),
    # OLMo 2 normalises q and k over all heads' channels.
    Family(name="olmo2", model_types=("olmo2",), layers="model.layers", embed="model.embed_tokens.weight",
           shapes=_LLAMA_TOP, tied=_LLAMA_TIED,
           layer_shapes={**_LLAMA_LAYER, "self_attn.q_norm.weight": "Q", "self_attn.k_norm.weight": "KV"},
           projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
           **_LLAMA_KEYS),
    # Phi-3 fuses q, k, v into qkv_proj (in that order) and gate, up into gate_up_proj.
    Family(name="phi3", model_types=("phi3",), layers="model.layers", embed="model.embed_tokens.weight",
           shapes=_LLAMA_TOP, tied=_LLAMA_TIED, attention="phi3",
           layer_shapes={**_both("input_layernorm", "post_attention_layernorm", shape="D"),
                         "self_attn.qkv_proj.weight": "Q+2*KV,D", "self_attn.o_proj.weight": "D,Q",
                         "mlp.gate_up_proj.weight": "2*I,D", "mlp.down_proj.weight": "D,I"},
           projections=("self_attn.qkv_proj", "self_attn.o_proj"), **_LLAMA_KEYS),
    Family(name="phi", model_types=("phi",), layers="model.layers", embed="model.embed_tokens.weight",
           shapes={"model.embed_tokens.weight": "V,D", **_both("model.final_layernorm", shape="D"),
                   **_linear("lm_head", "V", "D")},
           layer_shapes={**_both("input_layernorm", shape="D"),
                         **_linear("self_attn.q_proj", "Q", "D"), **_linear("self_attn.k_proj", "KV", "D"),
                         **_linear("self_attn.v_proj", "KV", "D"), **_linear("self_attn.dense", "D", "Q"),
                         **_both("self_attn.q_layernorm", "self_attn.k_layernorm", shape="hd"),
                         **_linear("mlp.fc1", "I", "D"), **_linear("mlp.fc2", "D", "I")},
           tied=_LLAMA_TIED, projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.dense"),
           **{**_LLAMA_KEYS, "eps": ("layer_norm_eps",)}),
    # GPT-2's Conv1D keeps its weights as [in, out]; c_attn makes q, k, v side by side, each n_embd wide.
    Family(name="gpt2", model_types=("gpt2",), layers="transformer.h", embed="transformer.wte.weight",
           shapes={"transformer.wte.weight": "V,D", "transformer.wpe.weight": "P,D",
                   **_both("transformer.ln_f", shape="D"), "lm_head.weight": "V,D"},
           layer_shapes={**_both("ln_1", "ln_2", shape="D"),
                         "attn.c_attn.weight": "D,3*Q", "attn.c_attn.bias": "3*Q",
                         "attn.c_proj.weight": "Q,D", "attn.c_proj.bias": "D",
                         "mlp.c_fc.weight": "D,I", "mlp.c_fc.bias": "I",
                         "mlp.c_proj.weight": "I,D", "mlp.c_proj.bias": "D"},
           hidden="n_embd", ffn="n_inner", heads="n_head", num_layers="n_layer", eps=("layer_norm_epsilon",),
           tied={"lm_head.weight": "transformer.wte.weight"}, attention="gpt2",
           projections=("attn.c_attn", "attn.c_proj")),
    _bert_like("bert", "bert",
               {**_linear("cls.predictions.transform.dense", "D", "D"),
                **_both("cls.predictions.transform.LayerNorm", shape="D"), "cls.predictions.bias": "V",
                **_linear("cls.predictions.decoder", "V", "D"), **_linear("classifier", "C", "D"),
                **_linear("cls.seq_relationship", "C", "D")},
               {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}),
    _bert_like("roberta", "roberta",
               {**_linear("lm_head.dense", "D", "D"), **_both("lm_head.layer_norm", shape="D"), "lm_head.bias": "V",
                **_linear("lm_head.decoder", "V", "D"), **_linear("classifier.dense", "D", "D"),
                **_linear("classifier.out_proj", "C", "D")},
               {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                "lm_head.decoder.bias": "lm_head.bias"}),
    # OPT's LayerNorms use torch's default epsilon (no config key); its embeddings are word_embed_proj_dim wide.
    Family(name="opt", model_types=("opt",), layers="model.decoder.layers", embed="model.decoder.embed_tokens.weight",
           shapes={"model.decoder.embed_tokens.weight": "V,D", "model.decoder.embed_positions.weight": "P,D",
                   **_both("model.decoder.final_layer_norm", shape="D"), "lm_head.weight": "V,D"},
           layer_shapes={**_linear("self_attn.q_proj", "Q", "D"), **_linear("self_attn.k_proj", "Q", "D"),
                         **_linear("self_attn.v_proj", "Q", "D"), **_linear("self_attn.out_proj", "D", "Q"),
                         **_both("self_attn_layer_norm", "final_layer_norm", shape="D"),
                         **_linear("fc1", "I", "D"), **_linear("fc2", "D", "I")},
           hidden="hidden_size", ffn="ffn_dim", heads="num_attention_heads", num_layers="num_hidden_layers",
           tied={"lm_head.weight": "model.decoder.embed_tokens.weight"}, same_width=("word_embed_proj_dim",),
           projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")),
    # GPT-NeoX's query_key_value holds each head's q, k, v together: [q_0 k_0 v_0 q_1 k_1 v_1 ...].
    Family(name="gpt_neox", model_types=("gpt_neox",), layers="gpt_neox.layers", embed="gpt_neox.embed_in.weight",
           shapes={"gpt_neox.embed_in.weight": "V,D", **_both("gpt_neox.final_layer_norm", shape="D"),
                   "lm_head.weight": "V,D", "embed_out.weight": "V,D"},  # the head's name before transformers 5
           layer_shapes={**_both("input_layernorm", "post_attention_layernorm", shape="D"),
                         **_linear("attention.query_key_value", "3*Q", "D"), **_linear("attention.dense", "D", "Q"),
                         **_linear("mlp.dense_h_to_4h", "I", "D"), **_linear("mlp.dense_4h_to_h", "D", "I")},
           hidden="hidden_size", ffn="intermediate_size", heads="num_attention_heads", num_layers="num_hidden_layers",
           eps=("layer_norm_eps",), tied={"lm_head.weight": "gpt_neox.embed_in.weight"}, attention="neox",
           projections=("attention.query_key_value", "attention.dense")),
)


def family_of(config: Mapping[str, Any], where: str) -> Family:
    """The family of a checkpoint's config (its `model_type`); UsageError naming the supported ones otherwise."""
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
    raise NotApplicable(f"{where}: model_type {model_type!r} is not a family export-hf writes (it writes: {known})")


@dataclass
class Sizes:
    """The sizes a config holds: hidden, FFN, query and key/value widths, head size, blocks."""

    D: int
    I: int  # noqa: E741 (the symbol of the shape rules)
    Q: int
    KV: int
    hd: int
    layers: int

    @property
    def heads(self) -> int:
        return self.Q // self.hd

    @property
    def kv_heads(self) -> int:
        return self.KV // self.hd


def config_int(config: Mapping[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{where}: config.json's {key} is {value!r}, not a positive integer")
    return value


def parent_sizes(family: Family, config: Mapping[str, Any], where: str) -> Sizes:
    """The sizes of the parent checkpoint, from its config as transformers reads them."""
    hidden = config_int(config, family.hidden, where)
    heads = config_int(config, family.heads, where)
    ffn = config.get(family.ffn)
    if ffn is None and family.name == "gpt2":  # GPT-2 reads n_inner None as 4 x n_embd
        ffn = 4 * hidden
    ffn = config_int({family.ffn: ffn}, family.ffn, where)
    kv = config.get(family.kv_heads) if family.kv_heads else None
    kv = heads if kv is None else config_int(config, family.kv_heads or "", where)
    head_dim = config.get(family.head_dim) if family.head_dim else None
    if head_dim is None:
        if hidden % heads:
            raise UsageError(f"{where}: {family.hidden} {hidden} is not a multiple of {family.heads} {heads}")
        head_dim = hidden // heads
    head_dim = config_int({"head_dim": head_dim}, "head_dim", where)
    layers = config_int(config, family.num_layers, where)
    return Sizes(D=hidden, I=ffn, Q=heads * head_dim, KV=kv * head_dim, hd=head_dim, layers=layers)


def terms(axis: str) -> list[tuple[int, str | None]]:
    """An axis rule as a sum of (coefficient, symbol) terms: "Q+2*KV" -> [(1, "Q"), (2, "KV")]."""
    result: list[tuple[int, str | None]] = []
    for term in axis.split("+"):
        coefficient, symbol = 1, None
        for factor in term.split("*"):
            if factor.isdigit():
                coefficient *= int(factor)
            else:
                symbol = factor
        result.append((coefficient, symbol))
    return result


def evaluate(rule: str, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The shape that `rule` gives at `sizes` (which must hold every symbol it names)."""
    return tuple(sum(c * (sizes[s] if s else 1) for c, s in terms(axis)) for axis in rule.split(","))
