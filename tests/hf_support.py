"""Tiny Hugging Face transformers built from configs (seeded random weights, no download), exported to ONNX.

`hf_export(kind, dynamo)` (a session fixture) exports one of `ALL_KINDS` with the current exporter
(`dynamo=True`, through onnxscript) or the TorchScript one (`dynamo=False`) once per test session
and returns an `HFModel`: the file, its inputs, and `logits(feed)`, the Hugging Face model's own
output for the same arrays (`hf_model`, `config` and `facts` on it give the HF side). `KINDS` are the
five families the older test modules sweep, `ZOO_KINDS` the ones added after them. Sizes: hidden 32,
4 heads of 8, MLP 64, 2 blocks (swin: 2 stages of 2), vocabulary 100, sequence 8, images 16x16.

`facts(kind)` says what a family is (sizes, block layout, positions, experts, module paths, the HF
class and config); `build_hf_model(kind)` is the bare HF model, `hf_config(kind)` and `hf_class(kind)`
its config and class, `load_pretrained(kind, folder)` loads a saved or grown one. Every family exports
faithfully with both exporters; `EXPORT_FAILURES` records the Hugging Face MoE code that does not (and
why the MoE families run another), and tests/test_hf_zoo.py checks each export on fresh inputs and each
recorded failure.

Export times in seconds (the export call alone, TorchScript and dynamo, measured on a 2-core machine
that other jobs kept about 1.5 cores busy; the first export in a process pays about half a second more):

    family       TS dynamo      family       TS dynamo      family       TS dynamo
    bert        1.1   5.6      gemma       0.3   6.9      phi3        0.5   7.2
    gpt2        0.4   4.7      gemma2      0.6   8.6      falcon      0.5   6.4
    llama       0.5   6.4      gemma3      0.6   9.0      olmo2       0.5   6.9
    vit         0.3   2.4      qwen2       0.5   6.6      t5          0.4   5.9
    wav2vec2    0.2   6.1      qwen3       0.5   7.5      swin        0.8   7.3
    opt         0.1   5.0      mistral     0.5   6.9      mixtral     0.3   7.9
    gpt_neox    0.3   5.8      phi         0.4   6.8      qwen2_moe   0.3   8.1
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import journey_zoo
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

KINDS = ("bert", "gpt2", "llama", "vit", "wav2vec2")
ZOO_KINDS = ("opt", "gpt_neox", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "phi", "phi3", "falcon",
             "olmo2", "t5", "swin", "mixtral", "qwen2_moe")
ALL_KINDS = KINDS + ZOO_KINDS
VOCAB = 100
HIDDEN = 32
LAYERS = 2
SEQUENCE = 8
IMAGE = 16
FFN = 2 * HIDDEN
HEADS = 4
HEAD_DIM = HIDDEN // HEADS

# The reason recorded for a TorchScript export that runs but unrolls the loop over the experts that the
# example input routed to: an input routed to fewer experts then fails or computes something else.
BAKES_ROUTING = "trace bakes routing"

# (kind, experts implementation, dynamo) -> why that export is not faithful: the exception text, or
# BAKES_ROUTING. An experts implementation of None is the zoo's own model (every family and exporter
# exports faithfully today); the others are Hugging Face's implementations that the MoE families do not
# use, with the reason why not. tests/test_hf_zoo.py checks that each entry still fails this way, so
# that an entry goes as soon as the exporter handles it.
EXPORT_FAILURES: dict[tuple[str, str | None, bool], str] = {
    **{(kind, "eager", False): BAKES_ROUTING for kind in ("mixtral", "qwen2_moe")},
    **{(kind, "eager", True): "Could not guard on data-dependent expression" for kind in ("mixtral", "qwen2_moe")},
    # HF's default on a CPU in float32: a custom op that bins the tokens per expert with torch.histc.
    **{(kind, "grouped_mm", False): "Exporting the operator 'aten::histc' to ONNX opset version 17 is not supported"
       for kind in ("mixtral", "qwen2_moe")},
    **{(kind, "grouped_mm", True): "No ONNX function found for <OpOverload(op='transformers.grouped_mm_fallback'"
       for kind in ("mixtral", "qwen2_moe")},
}


@dataclass
class HFModel:
    """An exported tiny transformer and the eager model it came from."""

    kind: str
    dynamo: bool
    path: Path
    module: object  # the torch module that was exported (HF model in eval mode behind a wrapper)
    input_names: tuple[str, ...]
    export_seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.kind}-{'dynamo' if self.dynamo else 'torchscript'}"

    @property
    def output_name(self) -> str:
        """The ONNX output: "logits", or "last_hidden_state" for an encoder without a head (t5)."""
        return output_name(self.kind)

    @property
    def hf_model(self) -> Any:
        """The Hugging Face model (a `transformers.PreTrainedModel`, eval mode) behind the exported wrapper."""
        return self.module.model

    @property
    def config(self) -> Any:
        """The Hugging Face config of `hf_model`."""
        return self.hf_model.config

    @property
    def facts(self) -> dict[str, Any]:
        """`facts(kind)`: what the family is."""
        return facts(self.kind)

    def feed(self, seed: int = 0, batch: int = 2, sequence: int = SEQUENCE) -> dict[str, np.ndarray]:
        """Seeded inputs: ids in the vocabulary, masks of ones, pixels or 2*sequence audio samples in [-1, 1)."""
        rng = np.random.default_rng(seed)
        if "pixel_values" in self.input_names:
            return {"pixel_values": rng.uniform(-1, 1, (batch, 3, IMAGE, IMAGE)).astype(np.float32)}
        if "input_values" in self.input_names:
            return {"input_values": rng.uniform(-1, 1, (batch, 2 * sequence)).astype(np.float32)}
        feed = {"input_ids": rng.integers(0, VOCAB, (batch, sequence)).astype(np.int64),
                "attention_mask": np.ones((batch, sequence), np.int64)}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = rng.integers(0, 2, (batch, sequence)).astype(np.int64)
        return feed

    def logits(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The Hugging Face model's own output for `feed` (arrays named like the ONNX inputs)."""
        with torch.no_grad():
            args = [torch.from_numpy(np.asarray(feed[name])) for name in self.input_names]
            return self.module(*args).numpy()


def _causal(**family: Any) -> dict[str, Any]:
    """The arguments every tiny causal LM of the zoo shares, plus the family's own.

    Eager attention: the reference implementation, and the one that gemma2's soft-capping requires;
    it exports as the same MatMul-Softmax-MatMul chain for every family and both exporters.
    """
    return {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "max_position_embeddings": 64, "initializer_range": 0.1, "use_cache": False,
            "bos_token_id": 0, "eos_token_id": 0, "attn_implementation": "eager", **family}


def _rope(fraction: float) -> dict[str, Any]:
    """Rotary embeddings on `fraction` of each head (set explicitly: GPT-NeoX ignores a `partial_rotary_factor`
    argument and would rotate its default quarter)."""
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": fraction}}


# HF's default experts code cannot be exported faithfully (EXPORT_FAILURES); the batched one gathers each
# token's experts' weights, a graph without data-dependent control flow, and computes the same function.
_EXPERTS = "batched_mm"

# The zoo's families: sizes as above, the structure that makes each family distinctive switched on,
# grouped-query attention (2 key/value heads for 4 query heads) where the family allows it.
_ZOO_CONFIGS: dict[str, Callable[[], Any]] = {
    "opt": lambda: tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
        max_position_embeddings=64, word_embed_proj_dim=HIDDEN, do_layer_norm_before=True, init_std=0.1,
        use_cache=False, bos_token_id=0, eos_token_id=0, attn_implementation="eager"),
    # No grouped-query option in GPT-NeoX.
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_causal(intermediate_size=FFN, use_parallel_residual=True, **_rope(0.5))),
    # The multi-query family besides falcon: one key/value head, as in Gemma 2B.
    "gemma": lambda: tf.GemmaConfig(**_causal(intermediate_size=FFN, num_key_value_heads=1, head_dim=HEAD_DIM)),
    # Caps of 2 bite: attention scores and logits reach about 4.5 before capping. Layer 0 attends through a
    # window of 4 tokens.
    "gemma2": lambda: tf.Gemma2Config(**_causal(
        intermediate_size=FFN, num_key_value_heads=2, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=2.0,
        final_logit_softcapping=2.0)),
    "gemma3": lambda: tf.Gemma3TextConfig(**_causal(
        intermediate_size=FFN, num_key_value_heads=2, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "qwen2": lambda: tf.Qwen2Config(**_causal(intermediate_size=FFN, num_key_value_heads=2)),
    "qwen3": lambda: tf.Qwen3Config(**_causal(intermediate_size=FFN, num_key_value_heads=2, head_dim=HEAD_DIM)),
    # A window shorter than the sequence, so that the sliding-window mask matters.
    "mistral": lambda: tf.MistralConfig(**_causal(intermediate_size=FFN, num_key_value_heads=2, head_dim=HEAD_DIM,
                                                  sliding_window=4)),
    "phi": lambda: tf.PhiConfig(**_causal(intermediate_size=FFN, num_key_value_heads=2, **_rope(0.5))),
    # Phi-3's default pad token (32000) is outside the tiny vocabulary.
    "phi3": lambda: tf.Phi3Config(**_causal(intermediate_size=FFN, num_key_value_heads=2,
                                            original_max_position_embeddings=64, pad_token_id=0)),
    # Multi-query (one key/value head) is implied by multi_query=True in the old decoder architecture.
    "falcon": lambda: tf.FalconConfig(**_causal(multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                                ffn_hidden_size=FFN, bias=True)),
    "olmo2": lambda: tf.Olmo2Config(**_causal(intermediate_size=FFN, num_key_value_heads=2)),
    # T5 v1.1's gated-GELU feed-forward; 8 relative-position buckets for distances up to 16.
    "t5": lambda: tf.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, attn_implementation="eager"),
    # 16x16 pixels in 2x2 patches: stage 1 has 8x8 tokens in 4x4 windows (block 1 shifts them), patch
    # merging halves the grid and doubles the width to HIDDEN for stage 2 (one window).
    "swin": lambda: tf.SwinConfig(
        image_size=IMAGE, patch_size=2, num_channels=3, embed_dim=HIDDEN // 2, depths=[2, 2], num_heads=[2, HEADS],
        window_size=4, mlp_ratio=2.0, num_labels=10, initializer_range=0.1, attn_implementation="eager"),
    "mixtral": lambda: tf.MixtralConfig(**_causal(
        intermediate_size=FFN, num_key_value_heads=2, head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2,
        experts_implementation=_EXPERTS)),
    # Every layer sparse; the top-2 weights stay softmax probabilities (norm_topk_prob=False, Qwen1.5-MoE).
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**_causal(
        intermediate_size=FFN, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=FFN, decoder_sparse_step=1, norm_topk_prob=False,
        experts_implementation=_EXPERTS)),
}
_ZOO_CLASSES = {"opt": "OPTForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "gemma": "GemmaForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "phi": "PhiForCausalLM",
                "phi3": "Phi3ForCausalLM", "falcon": "FalconForCausalLM", "olmo2": "Olmo2ForCausalLM",
                "t5": "T5EncoderModel", "swin": "SwinForImageClassification", "mixtral": "MixtralForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM"}

def _layers(pattern: str, count: int = LAYERS) -> tuple[str, ...]:
    return tuple(pattern.format(i) for i in range(count))


# What every family is, written down independently of the configs (tests/test_hf_zoo.py measures each
# fact on the built model). `facts()` documents the keys; a family lists only where it differs from a
# llama-like decoder.
_DECODER: dict[str, Any] = {
    "modality": "text", "head": "causal_lm", "output": "logits",
    "hidden_size": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "ffn_size": FFN,
    "norm": "rmsnorm", "norm_plus_one": False, "norms_per_block": 2,
    "pre_norm": True, "post_norm": False, "post_sublayer_norm": False, "parallel": False,
    "positions": "rotary", "rotary_dim": HEAD_DIM, "embedding_scale": 1.0,
    "qk_norm": None, "qkv_bias": False, "fused_qkv": False, "gated_mlp": True, "fused_gate_up": False,
    "experts": 0, "top_k": 0, "shared_expert_ffn": 0, "experts_implementation": None,
    "sliding_window": None, "attn_softcap": None, "final_softcap": None,
    "tied_embeddings": False, "attn_implementation": "eager",
    "blocks": _layers("model.layers.{}"), "attention": "self_attn", "mlp": ("mlp",),
}
_LEARNED = {"positions": "learned", "rotary_dim": None}
_BERT_LIKE = {"norm": "layernorm", "qkv_bias": True, "gated_mlp": False, "attn_implementation": "sdpa",
              "attention": "attention", "mlp": ("intermediate", "output")}
_GEMMA = {"norm_plus_one": True, "embedding_scale": HIDDEN ** 0.5, "tied_embeddings": True, "kv_heads": 2}
_SANDWICH = {"norms_per_block": 4, "post_sublayer_norm": True, "sliding_window": 4}
# HF keeps every expert's gate and up projections in one (experts, 2 * ffn, hidden) tensor.
_MOE = {"experts": 4, "top_k": 2, "experts_implementation": _EXPERTS, "kv_heads": 2, "fused_gate_up": True}


_FACTS: dict[str, dict[str, Any]] = {
    "bert": {**_BERT_LIKE, **_LEARNED, "head": "masked_lm", "pre_norm": False, "post_norm": True,
             "embedding_scale": 1.0, "tied_embeddings": True, "blocks": _layers("bert.encoder.layer.{}")},
    "gpt2": {**_LEARNED, "norm": "layernorm", "qkv_bias": True, "fused_qkv": True, "gated_mlp": False,
             "tied_embeddings": True, "attn_implementation": "sdpa", "blocks": _layers("transformer.h.{}"),
             "attention": "attn"},
    "llama": {"kv_heads": 2, "attn_implementation": "sdpa"},
    "vit": {**_BERT_LIKE, **_LEARNED, "modality": "image", "head": "image_classification", "embedding_scale": None,
            "blocks": _layers("vit.layers.{}"), "mlp": ("mlp",)},
    "wav2vec2": {**_BERT_LIKE, "modality": "audio", "head": "ctc", "positions": "conv", "rotary_dim": None,
                 "embedding_scale": None, "blocks": _layers("wav2vec2.encoder.layers.{}"),
                 "mlp": ("feed_forward",)},
    "opt": {**_LEARNED, "norm": "layernorm", "qkv_bias": True, "gated_mlp": False, "tied_embeddings": True,
            "blocks": _layers("model.decoder.layers.{}"), "mlp": ("fc1", "fc2")},
    # Attention and MLP both read the block input, each through its own LayerNorm.
    "gpt_neox": {"norm": "layernorm", "parallel": True, "rotary_dim": HEAD_DIM // 2, "qkv_bias": True,
                 "fused_qkv": True, "gated_mlp": False, "blocks": _layers("gpt_neox.layers.{}"),
                 "attention": "attention"},
    "gemma": {**_GEMMA, "kv_heads": 1},
    "gemma2": {**_GEMMA, **_SANDWICH, "attn_softcap": 2.0, "final_softcap": 2.0},
    "gemma3": {**_GEMMA, **_SANDWICH, "qk_norm": "per_head"},
    "qwen2": {"kv_heads": 2, "qkv_bias": True},
    "qwen3": {"kv_heads": 2, "qk_norm": "per_head"},
    "mistral": {"kv_heads": 2, "sliding_window": 4},
    # Attention and MLP both read one shared LayerNorm of the block input.
    "phi": {"norm": "layernorm", "norms_per_block": 1, "parallel": True, "kv_heads": 2, "rotary_dim": HEAD_DIM // 2,
            "qkv_bias": True, "gated_mlp": False},
    "phi3": {"kv_heads": 2, "fused_qkv": True, "fused_gate_up": True},
    "falcon": {"norm": "layernorm", "norms_per_block": 1, "parallel": True, "kv_heads": 1, "qkv_bias": True,
               "fused_qkv": True, "gated_mlp": False, "tied_embeddings": True, "blocks": _layers("transformer.h.{}"),
               "attention": "self_attention"},
    # No norm before the sublayers: each sublayer's output is normalised before the residual add.
    "olmo2": {"kv_heads": 2, "pre_norm": False, "post_sublayer_norm": True, "qk_norm": "full_width"},
    "t5": {"head": None, "output": "last_hidden_state", "positions": "relative_bias", "rotary_dim": None,
           "blocks": _layers("encoder.block.{}"), "attention": "layer.0.SelfAttention",
           "mlp": ("layer.1.DenseReluDense",)},
    # Sizes are those of the last stage; `stages` has each stage's (blocks, width, heads).
    "swin": {**_BERT_LIKE, "modality": "image", "head": "image_classification", "layers": 4,
             "positions": "window_bias", "rotary_dim": None, "embedding_scale": None, "attn_implementation": "eager",
             "blocks": tuple(f"swin.encoder.layers.{s}.blocks.{b}" for s in range(2) for b in range(2)),
             "mlp": ("mlp",), "stages": ((2, HIDDEN // 2, 2), (2, HIDDEN, HEADS)), "window_size": 4},
    "mixtral": {**_MOE},
    "qwen2_moe": {**_MOE, "ffn_size": 32, "shared_expert_ffn": FFN, "qkv_bias": True},
}


def _config_and_class(kind: str):  # -> (config, model class)
    common = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "intermediate_size": 2 * HIDDEN, "initializer_range": 0.1}
    if kind in _ZOO_CONFIGS:
        return _ZOO_CONFIGS[kind](), getattr(tf, _ZOO_CLASSES[kind])
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_inner=2 * HIDDEN,
                             n_positions=64, initializer_range=0.1, bos_token_id=0, eos_token_id=0), \
            tf.GPT2LMHeadModel
    if kind == "bert":
        return tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, type_vocab_size=2, **common), \
            tf.BertForMaskedLM
    if kind == "llama":
        # Grouped-query attention: 4 query heads share 2 key/value heads.
        return tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, num_key_value_heads=2,
                              bos_token_id=0, eos_token_id=0, **common), tf.LlamaForCausalLM
    if kind == "vit":
        return tf.ViTConfig(image_size=IMAGE, patch_size=8, num_channels=3, num_labels=10, **common), \
            tf.ViTForImageClassification
    if kind == "wav2vec2":
        # The stable-layer-norm (pre-norm) encoder; convolutions small enough for 16 samples.
        return tf.Wav2Vec2Config(vocab_size=20, conv_dim=(16, 16), conv_kernel=(4, 2), conv_stride=(2, 2),
                                 num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                                 do_stable_layer_norm=True, feat_extract_norm="layer", **common), \
            tf.Wav2Vec2ForCTC
    raise ValueError(f"unknown kind {kind!r}; known: {', '.join(ALL_KINDS)}")


def hf_config(kind: str) -> Any:
    """A fresh Hugging Face config of the tiny `kind` model (a `transformers.PretrainedConfig`)."""
    return _config_and_class(kind)[0]


def facts(kind: str) -> dict[str, Any]:
    """What the tiny `kind` model is, for tests to compare against (a new dict on every call).

    model_class, config: the Hugging Face class and a fresh config (`model_class(config)` is the model
        with fresh weights; `load_pretrained(kind, folder)` loads a saved or grown one).
    modality: "text", "image" or "audio"; head: "causal_lm", "masked_lm", "image_classification", "ctc"
        or None (t5's bare encoder); output: the ONNX output, "logits" or "last_hidden_state".
    hidden_size, layers (transformer blocks, all stages), heads, kv_heads (heads of keys and values:
        fewer than heads is grouped-query, 1 is multi-query attention), head_dim, ffn_size (the MLP's
        inner width; per expert in an MoE block).
    norm: "layernorm" or "rmsnorm"; norm_plus_one: the norm scales by 1 + weight (Gemma);
        norms_per_block: norms in a block outside attention (q/k norms not counted).
    pre_norm: each sublayer reads a norm of the residual stream; post_norm: a norm follows each
        residual add (BERT); post_sublayer_norm: each sublayer's output is normalised before it is added
        (Gemma 2/3 with pre_norm as well, OLMo 2 instead of it); parallel: attention and MLP both read the
        block input and both add to the residual (one shared norm when norms_per_block is 1).
    positions: "learned", "rotary", "relative_bias" (T5 buckets), "window_bias" (Swin) or "conv" (wav2vec2);
        rotary_dim: rotated channels per head (partial rotary below head_dim), None without rotary;
        embedding_scale: factor on the token embeddings (sqrt(hidden) in Gemma), None without token ids.
    qk_norm: None, "per_head" (over head_dim) or "full_width" (over all heads' channels);
        qkv_bias: a bias on the query/key/value projections; fused_qkv: one projection makes q, k and v.
    gated_mlp: act(gate(x)) * up(x); fused_gate_up: one projection makes gate and up.
    experts, top_k: experts per MoE block and experts per token (0 when dense); shared_expert_ffn: inner
        width of an always-on shared expert (0 if none); experts_implementation: HF's experts code the
        model runs (see EXPORT_FAILURES).
    sliding_window: the window of the layers with local attention; attn_softcap, final_softcap:
        tanh soft-capping of the attention scores and of the logits (Gemma 2).
    tied_embeddings: the LM head is the token embedding matrix; attn_implementation: HF's attention code.
    blocks: each block's module path in the HF model; attention, mlp: paths inside a block (mlp is a tuple:
        BERT-like blocks keep their MLP in two modules).
    swin only: stages ((blocks, width, heads) per stage) and window_size.
    """
    config, cls = _config_and_class(kind)
    return {"kind": kind, "model_class": cls, "config": config, **_DECODER, **_FACTS[kind]}


def hf_class(kind: str) -> type:
    """The Hugging Face model class of `kind` (e.g. `transformers.OPTForCausalLM`), for `from_pretrained`."""
    return _config_and_class(kind)[1]


def load_pretrained(kind: str, folder: str | os.PathLike) -> Any:
    """A saved (or grown) `kind` model from `folder`, in eval mode, running the zoo's attention and experts code.

    `save_pretrained` does not store which implementations ran, and `from_pretrained` alone would pick sdpa
    attention and grouped_mm experts (which compute the same function, but the latter does not export).
    """
    fact = facts(kind)
    chosen = {"attn_implementation": fact["attn_implementation"]}
    if fact["experts_implementation"]:
        chosen["experts_implementation"] = fact["experts_implementation"]
    return fact["model_class"].from_pretrained(folder, **chosen).eval()


def input_names(kind: str) -> tuple[str, ...]:
    """The exported model's inputs, in the order the wrapper takes them."""
    if kind in ("vit", "swin"):
        return ("pixel_values",)
    if kind == "wav2vec2":
        return ("input_values",)
    return ("input_ids", "attention_mask", "token_type_ids") if kind == "bert" else ("input_ids", "attention_mask")


def output_name(kind: str) -> str:
    """The exported model's one output: the head's logits, or the encoder's last hidden state (t5)."""
    return "last_hidden_state" if kind == "t5" else "logits"


def build_hf_model(kind: str, seed: int = 0, experts_implementation: str | None = None) -> Any:
    """The bare HF model of `kind` in eval mode with seeded random weights (what `build_module` wraps).

    `experts_implementation` replaces an MoE family's (only to check the entries of EXPORT_FAILURES).
    """
    torch.manual_seed(seed)
    config, cls = _config_and_class(kind)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    model = cls(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # HF initialises norms to gamma 1, beta 0 (and the exporter then shares one tensor between
        # them); random ones make every norm and bias count in the comparisons.
        for name, param in model.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator) * 0.2
                param.copy_((1.0 + noise) if "norm" in name.lower() and "weight" in name else noise)
    return model


def build_module(kind: str, seed: int = 0, experts_implementation: str | None = None):  # -> (module, input names)
    """The HF model of `kind` with seeded random weights, wrapped to take positional inputs and return logits."""
    model = build_hf_model(kind, seed, experts_implementation)
    names = input_names(kind)
    if kind in ("vit", "swin", "wav2vec2"):
        return _SignalLogits(model, names[0]).eval(), names
    # eval() on the wrapper too: the TorchScript exporter restores the wrapper's mode on every submodule.
    return _TextLogits(model, len(names) == 3, output_name(kind)).eval(), names


class _TextLogits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, token_types: bool, output: str = "logits") -> None:
        super().__init__()
        self.model, self.token_types, self.output = model, token_types, output

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if self.token_types:
            extra = {"token_type_ids": token_type_ids}
        else:  # an encoder (t5) has no cache to switch off
            extra = {} if self.output == "last_hidden_state" else {"use_cache": False}
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, **extra), self.output)


class _SignalLogits(torch.nn.Module):
    """An image or audio model: one float input."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, signal):
        return self.model(**{self.name: signal}).logits


def export(kind: str, dynamo: bool, folder: Path, seed: int = 0, experts_implementation: str | None = None) -> HFModel:
    """Build the tiny `kind` model and export it to `folder` with the dynamo or the TorchScript exporter."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    module, names = build_module(kind, seed, experts_implementation)
    example = HFModel(kind, dynamo, Path(), module, names, 0.0).feed(seed=seed)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    variant = f"_{experts_implementation}" if experts_implementation else ""
    path = folder / f"{kind}{variant}_{'dynamo' if dynamo else 'torchscript'}.onnx"
    dynamic = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"}) for n in names}
    # dynamic_shapes are keyed by the forward's argument names
    by_argument = {("signal" if n in ("pixel_values", "input_values") else n): axes for n, axes in dynamic.items()}
    start = time.perf_counter()
    journey_zoo.torch_export(module, args, path, names, [output_name(kind)], dynamo, dynamic, by_argument)
    return HFModel(kind, dynamo, path, module, names, time.perf_counter() - start)


# One export per model and exporter per process: each test module imports the fixture (so pytest
# sees one fixture per module), and they all share this cache.
_EXPORTS: dict[tuple[str, bool], HFModel] = {}


@pytest.fixture(scope="session")
def hf_export(tmp_path_factory: pytest.TempPathFactory):
    """`hf_export(kind, dynamo)` -> HFModel, exported once per test session."""

    def get(kind: str, dynamo: bool) -> HFModel:
        if dynamo:
            pytest.importorskip("onnxscript")
        key = (kind, dynamo)
        if (kind, None, dynamo) in EXPORT_FAILURES:  # an unfaithful model would make every check on it moot
            pytest.fail(f"{kind} has no faithful {'dynamo' if dynamo else 'TorchScript'} export: "
                        f"{EXPORT_FAILURES[kind, None, dynamo]}")
        if key not in _EXPORTS or not _EXPORTS[key].path.is_file():
            _EXPORTS[key] = export(kind, dynamo, tmp_path_factory.mktemp(f"hf_{kind}_{int(dynamo)}"))
        return _EXPORTS[key]

    return get
