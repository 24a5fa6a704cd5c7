"""Tiny models of families no other test builds (random weights, no download), for the user's-journey sweep.

`benchmarks/journey_sweep.py` walks each of these through inspect, block, widen, moe, verify, diff,
train and export-hf; `tests/test_journey.py` keeps regression tests for what the sweep found. Nothing
here imports pytest: the sweep runs without it.

`FAMILIES` maps a name to a `Spec`: how to build the model (a Hugging Face class from a config, or
plain PyTorch written the way people write it), what it takes and returns, and what it is (blocks,
heads, key/value heads, FFN width, experts) written down from the config, for `inspect` to be
compared with. `export(name, dynamo, folder)` builds and exports one, returning a `Built` whose
`eager(feed)` is the model's own output on the same arrays.

Sizes: hidden 32, 4 heads of 8 (2 key/value heads where the family has grouped-query attention),
FFN 64, 2 blocks, vocabulary 100, sequence 8, images 32x32 (CNNs) or 16x16 (ViTs), 4 MoE experts top-2.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 100
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 2 * HIDDEN
LAYERS = 2
SEQUENCE = 8
IMAGE = 16
CNN_IMAGE = 32
CLASSES = 10
EXPERTS_IMPL = "batched_mm"  # HF's default experts code does not export (tests/hf_support.py EXPORT_FAILURES)


@dataclass
class Spec:
    """One family: how it is built and what it is."""

    name: str
    build: Callable[[], tuple[Any, Any]]  # -> (wrapper module returning one tensor, HF model or None)
    inputs: str  # "text", "text_tt" (with token_type_ids), "image", "cnn_image", "audio_raw", "mel", "features"
    loss: str  # "causal_lm", "token_cross_entropy", "cross_entropy", "mse"
    layers: int | None = LAYERS  # transformer blocks (None: not a transformer)
    heads: int | None = HEADS
    kv_heads: int | None = HEADS
    hidden: int | None = HIDDEN
    ffn: int | None = FFN
    experts: int = 0
    top_k: int = 0
    notes: str = ""  # what is distinctive about it
    quick: bool = False  # in `journey_sweep.py --quick`
    extra: dict[str, Any] = field(default_factory=dict)


def _torch() -> Any:
    import torch

    return torch


def _tf() -> Any:
    import transformers

    return transformers


# ---- wrappers: the README's recipe (the cache off, a module that returns one tensor) ----

def _wrappers() -> dict[str, type]:
    torch = _torch()

    class TextLogits(torch.nn.Module):
        def __init__(self, model: Any, use_cache: bool = True, output: str = "logits") -> None:
            super().__init__()
            self.model, self.use_cache, self.output = model, use_cache, output

        def forward(self, input_ids, attention_mask):
            extra = {"use_cache": False} if self.use_cache else {}
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, **extra), self.output)

    class TextTypesLogits(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    class SignalOutput(torch.nn.Module):
        def __init__(self, model: Any, name: str, output: str = "logits") -> None:
            super().__init__()
            self.model, self.name, self.output = model, name, output

        def forward(self, signal):
            return getattr(self.model(**{self.name: signal}), self.output)

    return {"text": TextLogits, "text_tt": TextTypesLogits, "signal": SignalOutput}


def _randomize(model: Any, seed: int) -> Any:
    """Norm weights near 1 and every bias random: HF initialises them to 1 and 0, which hides mistakes."""
    torch = _torch()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator) * 0.2
                scale = any(k in name.lower() for k in ("norm", "ln", "layer_scale", "lambda")) and "bias" not in name
                param.copy_((1.0 + noise) if scale else noise)
    return model.eval()


def _hf(cls_name: str, config: Callable[[], Any], kind: str = "text", **wrap: Any) -> Callable[[], tuple[Any, Any]]:
    def build() -> tuple[Any, Any]:
        torch = _torch()
        torch.manual_seed(0)
        cfg = config()
        model = _randomize(getattr(_tf(), cls_name)(cfg), 0)
        wrapper = _wrappers()["text" if kind == "text" else "text_tt" if kind == "text_tt" else "signal"]
        return wrapper(model, **wrap).eval(), model

    return build


def _causal(**family: Any) -> dict[str, Any]:
    return {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": FFN, "max_position_embeddings": 64, "initializer_range": 0.1, "use_cache": False,
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **family}


def _encoder(**family: Any) -> dict[str, Any]:
    return {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": FFN, "max_position_embeddings": 64, "initializer_range": 0.1, "pad_token_id": 0,
            **family}


def _vision(**family: Any) -> dict[str, Any]:
    return {"image_size": IMAGE, "patch_size": 4, "num_channels": 3, "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": FFN,
            "initializer_range": 0.1, "num_labels": CLASSES, **family}


def _c(cls: str, **kwargs: Any) -> Callable[[], Any]:
    return lambda: getattr(_tf(), cls)(**kwargs)


# ---- plain PyTorch, written the way people write it ----

def _nanogpt() -> tuple[Any, None]:
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class CausalSelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)
            self.c_proj = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(HIDDEN, dim=2)
            k = k.view(B, T, HEADS, C // HEADS).transpose(1, 2)
            q = q.view(B, T, HEADS, C // HEADS).transpose(1, 2)
            v = v.view(B, T, HEADS, C // HEADS).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C)
            return self.c_proj(y)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = nn.Linear(HIDDEN, FFN)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(FFN, HIDDEN)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(HIDDEN)
            self.attn = CausalSelfAttention()
            self.ln_2 = nn.LayerNorm(HIDDEN)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(VOCAB, HIDDEN), wpe=nn.Embedding(64, HIDDEN),
                h=nn.ModuleList([Block() for _ in range(LAYERS)]), ln_f=nn.LayerNorm(HIDDEN)))
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying

        def forward(self, idx):
            t = idx.size(1)
            pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
            for block in self.transformer.h:
                x = block(x)
            return self.lm_head(self.transformer.ln_f(x))

    torch.manual_seed(0)
    return _randomize(GPT(), 0), None


def _resnet() -> tuple[Any, None]:
    torch = _torch()
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1))
            self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(32, CLASSES)

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer2(self.layer1(x))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    return _cnn_stats(ResNet()), None


def _mobilenet() -> tuple[Any, None]:
    torch = _torch()
    nn = torch.nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            self.conv = nn.Sequential(
                nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                nn.Hardswish(),
                nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True)),
                InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4),
                nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(inplace=True)))
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, CLASSES))

        def forward(self, x):
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            return self.classifier(torch.flatten(x, 1))

    torch.manual_seed(0)
    return _cnn_stats(MobileNet()), None


def _cnn_stats(model: Any) -> Any:
    """Random running statistics and affine parameters in every BatchNorm, so that folding mistakes show."""
    torch = _torch()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                m.bias.copy_(0.2 * torch.randn(n, generator=generator))
    return model.eval()


def _audio_conv1d() -> tuple[Any, None]:
    torch = _torch()
    nn = torch.nn

    class AudioNet(nn.Module):
        """Raw waveform -> strided Conv1d front end -> residual Conv1d blocks -> mean over time -> classes."""

        def __init__(self) -> None:
            super().__init__()
            self.front = nn.Sequential(nn.Conv1d(1, 16, 9, stride=4, padding=4), nn.BatchNorm1d(16), nn.ReLU())
            self.block1 = nn.Sequential(nn.Conv1d(16, 16, 5, padding=2), nn.BatchNorm1d(16), nn.GELU(),
                                        nn.Conv1d(16, 16, 5, padding=2))
            self.down = nn.Conv1d(16, 32, 3, stride=2, padding=1)
            self.block2 = nn.Sequential(nn.Conv1d(32, 32, 3, padding=2, dilation=2), nn.GELU(),
                                        nn.Conv1d(32, 32, 1))
            self.head = nn.Linear(32, CLASSES)

        def forward(self, wave):
            x = self.front(wave.unsqueeze(1))
            x = x + self.block1(x)
            x = self.down(x)
            x = x + self.block2(x)
            return self.head(x.mean(dim=-1))

    torch.manual_seed(0)
    return _cnn_stats(AudioNet()), None


def _mlp() -> tuple[Any, None]:
    torch = _torch()
    nn = torch.nn

    class ResidualMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(20, HIDDEN)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, FFN), nn.SiLU(), nn.Linear(FFN, HIDDEN))
                for _ in range(LAYERS))
            self.norm = nn.LayerNorm(HIDDEN)
            self.out = nn.Linear(HIDDEN, CLASSES)

        def forward(self, x):
            h = self.inp(x)
            for block in self.blocks:
                h = h + block(h)
            return self.out(self.norm(h))

    torch.manual_seed(0)
    return _randomize(ResidualMLP(), 0), None


def _plain_mlp() -> tuple[Any, None]:
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, FFN), nn.LayerNorm(FFN), nn.SiLU(), nn.Linear(FFN, FFN), nn.LayerNorm(FFN),
                          nn.SiLU(), nn.Linear(FFN, CLASSES))
    return _randomize(model, 0), None


_MOE_COMMON = {"num_key_value_heads": KV_HEADS, "num_experts_per_tok": 2, "experts_implementation": EXPERTS_IMPL}

FAMILIES: dict[str, Spec] = {s.name: s for s in [
    # ---- causal LMs ----
    Spec("gptj", _hf("GPTJForCausalLM", _c("GPTJConfig", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                         n_inner=FFN, rotary_dim=4, n_positions=64, initializer_range=0.1,
                                         use_cache=False, bos_token_id=0, eos_token_id=0)),
         "text", "causal_lm", notes="parallel attention+MLP off one LayerNorm, interleaved partial rotary",
         quick=True),
    Spec("bloom", _hf("BloomForCausalLM", _c("BloomConfig", vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                                           n_head=HEADS, initializer_range=0.1, use_cache=False, bos_token_id=0,
                                           eos_token_id=0, pad_token_id=0)),
         "text", "causal_lm", ffn=4 * HIDDEN, notes="ALiBi, fused per-head qkv, embedding LayerNorm", quick=True),
    Spec("codegen", _hf("CodeGenForCausalLM", _c("CodeGenConfig", vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                               n_head=HEADS, n_inner=FFN, rotary_dim=4, n_positions=64, n_ctx=64,
                                               initializer_range=0.1, use_cache=False, bos_token_id=0,
                                               eos_token_id=0)),
         "text", "causal_lm", notes="fused qkv in mp_num=4 interleaved chunks, parallel block"),
    Spec("stablelm", _hf("StableLmForCausalLM", lambda: _tf().StableLmConfig(**_causal(
        num_key_value_heads=KV_HEADS, partial_rotary_factor=0.5, use_qkv_bias=True))),
         "text", "causal_lm", kv_heads=KV_HEADS, notes="LayerNorm, partial rotary, GQA, qkv bias", quick=True),
    Spec("starcoder2", _hf("Starcoder2ForCausalLM", lambda: _tf().Starcoder2Config(**_causal(
        num_key_value_heads=KV_HEADS, sliding_window=4))),
         "text", "causal_lm", kv_heads=KV_HEADS, notes="LayerNorm, GELU MLP c_fc/c_proj with bias, GQA, window"),
    Spec("gpt_bigcode", _hf("GPTBigCodeForCausalLM", _c("GPTBigCodeConfig", vocab_size=VOCAB, n_embd=HIDDEN,
                                                       n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=64,
                                                       multi_query=True, initializer_range=0.1, use_cache=False,
                                                       bos_token_id=0, eos_token_id=0)),
         "text", "causal_lm", kv_heads=1, notes="multi-query: fused c_attn of D + 2*head_dim", quick=True),
    Spec("cohere", _hf("CohereForCausalLM", lambda: _tf().CohereConfig(**_causal(
        num_key_value_heads=KV_HEADS, logit_scale=0.5, use_qk_norm=False))),
         "text", "causal_lm", kv_heads=KV_HEADS, notes="parallel block, bias-free LayerNorm, logit scale"),
    Spec("granite", _hf("GraniteForCausalLM", lambda: _tf().GraniteConfig(**_causal(
        num_key_value_heads=KV_HEADS, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
        logits_scaling=2.0))),
         "text", "causal_lm", kv_heads=KV_HEADS, notes="llama with embedding/residual/attention/logit multipliers"),
    Spec("xglm", _hf("XGLMForCausalLM", _c("XGLMConfig", vocab_size=VOCAB, d_model=HIDDEN, num_layers=LAYERS,
                                         attention_heads=HEADS, ffn_dim=FFN, max_position_embeddings=64,
                                         init_std=0.1, use_cache=False, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=1)),
         "text", "causal_lm", notes="sinusoidal positions, scaled embeddings, pre-LayerNorm"),
    Spec("mpt", _hf("MptForCausalLM", _c("MptConfig", vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                       expansion_ratio=2, max_seq_len=64, use_cache=False, bos_token_id=0,
                                       eos_token_id=0)),
         "text", "causal_lm", ffn=4 * HIDDEN,
         notes="ALiBi, fused Wqkv, bias-free LayerNorm (transformers builds a 4x FFN whatever expansion_ratio says)"),
    Spec("persimmon", _hf("PersimmonForCausalLM", lambda: _tf().PersimmonConfig(**_causal(
        partial_rotary_factor=0.5, qk_layernorm=True))),
         "text", "causal_lm", notes="relu^2 MLP, q/k LayerNorm per head, per-head fused qkv"),
    # ---- encoders ----
    Spec("roberta", _hf("RobertaForMaskedLM", lambda: _tf().RobertaConfig(**_encoder(
        max_position_embeddings=72, type_vocab_size=1)), use_cache=False),
         "text", "token_cross_entropy", notes="post-norm BERT, positions offset by the padding id"),
    Spec("distilbert", _hf("DistilBertForMaskedLM", _c("DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN,
                                                      n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                                      max_position_embeddings=64, initializer_range=0.1,
                                                      pad_token_id=0), use_cache=False),
         "text", "token_cross_entropy", notes="post-norm, no token types", quick=True),
    Spec("electra", _hf("ElectraForMaskedLM", lambda: _tf().ElectraConfig(**_encoder(embedding_size=16)),
                        use_cache=False),
         "text", "token_cross_entropy", notes="embedding 16 projected to 32; generator head"),
    Spec("albert", _hf("AlbertForMaskedLM", lambda: _tf().AlbertConfig(**_encoder(embedding_size=16)),
                       use_cache=False),
         "text", "token_cross_entropy", notes="one block's weights shared by all layers"),
    Spec("deberta_v2", _hf("DebertaV2ForMaskedLM", lambda: _tf().DebertaV2Config(**_encoder(
        relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, type_vocab_size=0)), use_cache=False),
         "text", "token_cross_entropy", notes="disentangled relative attention"),
    Spec("clip_text", _hf("CLIPTextModelWithProjection", lambda: _tf().CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, projection_dim=16, initializer_range=0.1,
        bos_token_id=0, eos_token_id=2, pad_token_id=1), use_cache=False, output="last_hidden_state"),
         "text", "mse", notes="causal mask, quick_gelu, last hidden state"),
    # ---- vision ----
    Spec("clip_vision", _hf("CLIPVisionModelWithProjection", lambda: _tf().CLIPVisionConfig(
        image_size=IMAGE, patch_size=4, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, projection_dim=16, initializer_range=0.1), kind="signal", name="pixel_values",
        output="image_embeds"),
         "image", "mse", notes="pre-LayerNorm, class token, projection of the pooled token"),
    Spec("deit", _hf("DeiTForImageClassification", lambda: _tf().DeiTConfig(**_vision()), kind="signal",
                     name="pixel_values"),
         "image", "cross_entropy", notes="ViT without distillation token in this head", quick=True),
    Spec("beit", _hf("BeitForImageClassification", lambda: _tf().BeitConfig(**_vision(
        use_relative_position_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True)), kind="signal",
        name="pixel_values"),
         "image", "cross_entropy", notes="relative position bias, layer scale, mean pooling"),
    Spec("convnext", _hf("ConvNextForImageClassification", lambda: _tf().ConvNextConfig(
        num_channels=3, patch_size=4, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=CNN_IMAGE,
        num_labels=CLASSES, layer_scale_init_value=0.1), kind="signal", name="pixel_values"),
         "cnn_image", "cross_entropy", layers=None, heads=None, kv_heads=None, hidden=None, ffn=None,
         notes="depthwise 7x7, channels-last LayerNorm, layer scale"),
    Spec("resnet", _hf("ResNetForImageClassification", lambda: _tf().ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
        num_labels=CLASSES), kind="signal", name="pixel_values"),
         "cnn_image", "cross_entropy", layers=None, heads=None, kv_heads=None, hidden=None, ffn=None,
         notes="HF ResNet, basic blocks", quick=True),
    Spec("mobilevit", _hf("MobileViTForImageClassification", lambda: _tf().MobileViTConfig(
        num_channels=3, image_size=CNN_IMAGE, patch_size=2, hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48],
        num_attention_heads=HEADS, mlp_ratio=2.0, num_labels=CLASSES), kind="signal", name="pixel_values"),
         "cnn_image", "cross_entropy", layers=None, heads=HEADS, kv_heads=HEADS, hidden=None, ffn=None,
         notes="convs with transformer blocks over unfolded patches"),
    # ---- audio ----
    Spec("whisper_encoder", _hf("WhisperForAudioClassification", lambda: _tf().WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_layers=1, decoder_attention_heads=HEADS, d_model=HIDDEN, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_source_positions=16, max_target_positions=16, num_labels=CLASSES, classifier_proj_size=16,
        init_std=0.1, use_weighted_layer_sum=False, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        decoder_start_token_id=0), kind="signal", name="input_features"),
         "mel", "cross_entropy", notes="two Conv1d + GELU front end, sinusoidal positions, fixed 32 frames"),
    # ---- mixtures of experts ----
    Spec("qwen3_moe", _hf("Qwen3MoeForCausalLM", lambda: _tf().Qwen3MoeConfig(**_causal(
        head_dim=HEAD_DIM, num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
        **_MOE_COMMON))),
         "text", "causal_lm", kv_heads=KV_HEADS, ffn=32, experts=4, top_k=2, notes="q/k RMSNorm, top-2 of 4",
         quick=True),
    Spec("olmoe", _hf("OlmoeForCausalLM", lambda: _tf().OlmoeConfig(**_causal(
        num_experts=4, norm_topk_prob=False, **_MOE_COMMON))),
         "text", "causal_lm", kv_heads=KV_HEADS, experts=4, top_k=2, notes="full-width q/k norm, top-2 of 4"),
    Spec("granitemoe", _hf("GraniteMoeForCausalLM", lambda: _tf().GraniteMoeConfig(**_causal(
        num_local_experts=4, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
        logits_scaling=2.0, **_MOE_COMMON))),
         "text", "causal_lm", kv_heads=KV_HEADS, experts=4, top_k=2, notes="multipliers, top-k then softmax"),
    Spec("phimoe", _hf("PhimoeForCausalLM", lambda: _tf().PhimoeConfig(**_causal(
        num_local_experts=4, **_MOE_COMMON))),
         "text", "causal_lm", kv_heads=KV_HEADS, experts=4, top_k=2, notes="sparsemixer routing, LayerNorm"),
    # ---- plain PyTorch ----
    Spec("nanogpt", _nanogpt, "text_ids", "causal_lm", notes="fused c_attn, F.scaled_dot_product_attention, tied",
         quick=True),
    Spec("hand_resnet", _resnet, "cnn_image", "cross_entropy", layers=None, heads=None, kv_heads=None, hidden=None,
         ffn=None, notes="basic blocks, 1x1 projection shortcut, adaptive pool", quick=True),
    Spec("hand_mobilenet", _mobilenet, "cnn_image", "cross_entropy", layers=None, heads=None, kv_heads=None,
         hidden=None, ffn=None, notes="inverted residuals, depthwise, ReLU6, Hardswish"),
    Spec("conv1d_audio", _audio_conv1d, "audio_raw", "cross_entropy", layers=None, heads=None, kv_heads=None,
         hidden=None, ffn=None, notes="strided/dilated Conv1d, BatchNorm1d, residual, mean over time", quick=True),
    Spec("mlp_ln_silu", _mlp, "features", "cross_entropy", layers=LAYERS, heads=None, kv_heads=None,
         notes="pre-LayerNorm residual MLP blocks with SiLU"),
    Spec("plain_mlp", _plain_mlp, "features", "cross_entropy", layers=None, heads=None, kv_heads=None, hidden=None,
         ffn=None, notes="Linear-LayerNorm-SiLU stack, no residual"),
]}

# What each input layout takes: names, and which axes are dynamic.
_INPUTS: dict[str, tuple[tuple[str, ...], dict[int, str]]] = {
    "text": (("input_ids", "attention_mask"), {0: "batch", 1: "sequence"}),
    "text_tt": (("input_ids", "attention_mask", "token_type_ids"), {0: "batch", 1: "sequence"}),
    "text_ids": (("input_ids",), {0: "batch", 1: "sequence"}),
    "image": (("pixel_values",), {0: "batch"}),
    "cnn_image": (("pixel_values",), {0: "batch"}),
    "audio_raw": (("input_values",), {0: "batch", 1: "time"}),
    "mel": (("input_features",), {0: "batch"}),
    "features": (("features",), {0: "batch"}),
}


def input_names(spec: Spec) -> tuple[str, ...]:
    return _INPUTS[spec.inputs][0]


def feed(spec: Spec, seed: int = 0, batch: int = 2, sequence: int = SEQUENCE) -> dict[str, np.ndarray]:
    """Seeded inputs: ids in the vocabulary with masks of ones, or floats in [-1, 1)."""
    rng = np.random.default_rng(seed)
    kind = spec.inputs
    if kind.startswith("text"):
        out = {"input_ids": rng.integers(0, VOCAB, (batch, sequence)).astype(np.int64)}
        if kind != "text_ids":
            out["attention_mask"] = np.ones((batch, sequence), np.int64)
        if kind == "text_tt":
            out["token_type_ids"] = rng.integers(0, 2, (batch, sequence)).astype(np.int64)
        return out
    shape = {"image": (3, IMAGE, IMAGE), "cnn_image": (3, CNN_IMAGE, CNN_IMAGE), "audio_raw": (16 * sequence,),
             "mel": (16, 32), "features": (20,)}[kind]
    return {input_names(spec)[0]: rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)}


@dataclass
class Built:
    """An exported model and the eager module it came from."""

    spec: Spec
    dynamo: bool
    path: Path
    module: Any
    hf_model: Any  # the Hugging Face model, or None for plain PyTorch
    seconds: float

    def eager(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The eager model's output on `arrays` (named like the ONNX inputs)."""
        torch = _torch()
        with torch.no_grad():
            args = [torch.from_numpy(np.asarray(arrays[n])) for n in input_names(self.spec)]
            return self.module(*args).numpy()


def torch_export(module: Any, args: tuple, path: Path, names: list[str] | tuple[str, ...], outputs: list[str],
                 dynamo: bool, dynamic_axes: dict[str, dict[int, str]],
                 dynamic_shapes: dict[str, dict[int, str]]) -> None:
    """`torch.onnx.export` of `module` to `path`, its progress and warnings kept quiet: TorchScript with
    `dynamic_axes` (by input name), or dynamo with `dynamic_shapes` (by forward argument name, every axis named
    there dynamic), opset 17 / the exporter's own."""
    torch = _torch()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "transformers", "onnxscript")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            if dynamo:
                dim = torch.export.Dim.DYNAMIC
                shapes = {n: {a: dim for a in axes} for n, axes in dynamic_shapes.items()}
                program = torch.onnx.export(module, args, input_names=list(names), output_names=outputs,
                                            dynamo=True, dynamic_shapes=shapes, external_data=False,
                                            report=False, verify=False)
                program.save(str(path), external_data=False)
            else:
                torch.onnx.export(module, args, str(path), input_names=list(names), output_names=outputs,
                                  dynamo=False, dynamic_axes=dynamic_axes, opset_version=17)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)


def build(name: str) -> tuple[Any, Any]:
    """(module that is exported, HF model or None) of family `name`, in eval mode."""
    return FAMILIES[name].build()


def export(name: str, dynamo: bool, folder: Path, module: Any = None, hf_model: Any = None) -> Built:
    """Build family `name` (or take `module`) and export it to `folder` with the README's recipe."""
    torch = _torch()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = FAMILIES[name]
    if module is None:
        module, hf_model = build(name)
    names = input_names(spec)
    example = feed(spec, seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    axes = _INPUTS[spec.inputs][1]
    path = Path(folder) / f"{name}_{'dynamo' if dynamo else 'torchscript'}.onnx"
    start = time.perf_counter()
    import inspect as pyinspect

    params = list(pyinspect.signature(module.forward).parameters)
    torch_export(module, args, path, names, ["output"], dynamo, {n: axes for n in names},
                 {params[k]: axes for k in range(len(names))})
    return Built(spec, dynamo, path, module, hf_model, time.perf_counter() - start)
