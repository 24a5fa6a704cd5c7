"""Attention ops for onnxmorph.train: ONNX Attention (opset 23; 24's nonpad_kv_seqlen) and RotaryEmbedding (23).

The dynamo exporter writes them from opset 23 on (scaled_dot_product_attention becomes Attention);
both follow the ONNX reference implementation, including its corner cases: a boolean mask keeps
True positions, a float mask is added, a fully masked query row gives zeros, grouped key/value
heads are repeated (interleaved) to the query heads.
"""

from __future__ import annotations

import math

import torch

from onnxmorph.train.optable import Call, broadcast, op, torch_dtype

Tensor = torch.Tensor


def _heads(x: Tensor, heads: int | None, call: Call, what: str) -> Tensor:
    """[B, S, H*d] -> [B, H, S, d]; a 4-D input is already that."""
    if x.dim() == 4:
        return x
    if not heads:
        call.refuse(f"3-D {what} needs the q_num_heads and kv_num_heads attributes")
    b, s, width = x.shape
    return x.reshape(b, s, heads, width // heads).transpose(1, 2)


def _attention(call: Call, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
               past_key: Tensor | None = None, past_value: Tensor | None = None,
               nonpad_kv_seqlen: Tensor | None = None) -> tuple[Tensor, ...]:
    three_d = q.dim() == 3
    q = _heads(q, call.attr("q_num_heads"), call, "query")
    k = _heads(k, call.attr("kv_num_heads"), call, "key")
    v = _heads(v, call.attr("kv_num_heads"), call, "value")
    if (past_key is None) != (past_value is None):
        call.refuse("past_key and past_value must come together")
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    scale = call.attr("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_len, kv_len = q.shape[2], k.shape[2]
    dtype = q.dtype

    # the scores are [B, H, q_len, kv_len]: a long query and a long key/value cache multiply
    call.room([*broadcast(q.shape[:2], k.shape[:1] + q.shape[1:2]), q_len, kv_len], dtype, "its scores")
    bias = torch.zeros((q_len, kv_len), dtype=dtype, device=q.device)
    if mask is not None:
        if mask.shape[-1] < kv_len:  # a mask shorter than the keys is padded as masked
            pad = kv_len - mask.shape[-1]
            fill = False if mask.dtype == torch.bool else -math.inf
            mask = torch.nn.functional.pad(mask, (0, pad), value=fill)
        bias = bias + (torch.where(mask, 0.0, -math.inf).to(dtype) if mask.dtype == torch.bool else mask)
    offset: int | Tensor = past_key.shape[2] if past_key is not None else 0
    if nonpad_kv_seqlen is not None and past_key is None:
        offset = (nonpad_kv_seqlen.reshape(-1) - q_len).reshape(-1, 1, 1, 1)
    rows = torch.arange(q_len, device=q.device).reshape(q_len, 1)
    cols = torch.arange(kv_len, device=q.device).reshape(1, kv_len)
    if call.attr("is_causal", 0):
        bias = bias + torch.where(cols <= rows + offset, 0.0, -math.inf).to(dtype)
    left, right = call.attr("left_window_size", -1), call.attr("right_window_size", -1)
    if left >= 0 or right >= 0:
        diff = rows + offset - cols
        allowed = torch.ones_like(diff, dtype=torch.bool)
        if left >= 0:
            allowed = allowed & (diff <= left)
        if right >= 0:
            allowed = allowed & (-diff <= right)
        bias = bias + torch.where(allowed, 0.0, -math.inf).to(dtype)
    if nonpad_kv_seqlen is not None:
        keep = cols.reshape(1, 1, 1, kv_len) < nonpad_kv_seqlen.reshape(-1, 1, 1, 1)
        bias = bias + torch.where(keep, 0.0, -math.inf).to(dtype)

    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        if heads % kv_heads:
            call.refuse(f"{heads} query heads do not share {kv_heads} key/value heads evenly")
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)

    root = math.sqrt(scale)  # the reference scales q and k by sqrt(scale) each
    scores = torch.matmul(q * root, (k * root).transpose(-1, -2))
    softcap = call.attr("softcap", 0.0)
    if softcap and softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    capped = scores
    biased = scores + bias
    precision = call.attr("softmax_precision")
    logits = biased.to(torch_dtype(precision)) if precision else biased
    # A row with every key masked has no key to attend: zeros, not the NaN of softmax(-inf, ..., -inf).
    dead = torch.isneginf(bias.amax(dim=-1, keepdim=True))
    probs = torch.softmax(torch.where(dead, 0.0, logits), dim=-1)
    probs = torch.where(dead, 0.0, probs).to(dtype)
    y = torch.matmul(probs, v)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    mode = call.attr("qk_matmul_output_mode", 0)
    qk = {0: scores, 1: capped, 2: biased, 3: probs}.get(mode)
    if qk is None:
        call.refuse(f"qk_matmul_output_mode={mode} is not an ONNX mode")
    return y, present_key, present_value, qk.to(dtype)


@op("Attention", since=23, outputs=4)
def _attention_23(call: Call, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                  past_key: Tensor | None = None, past_value: Tensor | None = None,
                  nonpad_kv_seqlen: Tensor | None = None) -> tuple[Tensor, ...]:
    return _attention(call, q, k, v, mask, past_key, past_value, nonpad_kv_seqlen)


@op("RotaryEmbedding", since=23)
def _rotary_embedding(call: Call, x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None) -> Tensor:
    four_d = x.dim() == 4
    shape = x.shape
    # Work in [B, S, H, d]: a 4-D input is [B, H, S, d], a 3-D one [B, S, H*d].
    if four_d:
        x = x.transpose(1, 2)
    else:
        heads = call.attr("num_heads", 0)
        if not heads:
            call.refuse("a 3-D input needs the num_heads attribute")
        x = x.reshape(shape[0], shape[1], heads, shape[2] // heads)
    dim = call.attr("rotary_embedding_dim", 0) or x.shape[-1]
    rotated, kept = x[..., :dim], x[..., dim:]
    if position_ids is not None:
        cos, sin = cos[position_ids.long()], sin[position_ids.long()]
    if cos.shape[-1] != dim // 2 or sin.shape[-1] != dim // 2:
        call.refuse(f"the cos/sin caches hold {cos.shape[-1]} values per position, not rotary_embedding_dim/2 = "
                    f"{dim // 2}")
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if call.attr("interleaved", 0):
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
    else:
        x1, x2 = rotated.chunk(2, dim=-1)
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if call.attr("interleaved", 0):
        rotated = torch.stack([real, imag], dim=-1).reshape(rotated.shape)
    else:
        rotated = torch.cat([real, imag], dim=-1)
    out = torch.cat([rotated, kept], dim=-1)
    return out.transpose(1, 2) if four_d else out.reshape(shape)
