"""A byte-level corpus from Python's own standard library and a small pre-norm GPT, for the growth experiment.

The corpus needs no download: a fixed list of standard-library modules, read as bytes (vocabulary
256), split into training and validation by file; `corpus()` records each file's size and the
SHA-256 of the concatenation, so a run says exactly what it trained on (the files differ between
Python versions). The model is a GPT-2-style decoder (pre-norm blocks, causal softmax attention,
GELU MLP, final LayerNorm), exported to ONNX with the TorchScript exporter.
"""

from __future__ import annotations

import hashlib
import io
import math
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TRAIN_FILES", "VALIDATION_FILES", "GPTConfig", "GPT", "corpus", "windows", "export", "lm_loss",
           "step_flops"]

VOCAB = 256
# The corpus: standard-library modules present under these names from Python 3.9 to 3.13, listed in
# corpus_files.txt beside this module (data, not code). Validation files are whole modules the model
# never trains on.
_CORPUS_LIST = dict(
    line.split(":", 1) for line in (Path(__file__).with_name("corpus_files.txt")).read_text().splitlines()
    if ":" in line and not line.startswith("#")
)
TRAIN_FILES = tuple(_CORPUS_LIST["train"].split())
VALIDATION_FILES = tuple(_CORPUS_LIST["validation"].split())


def _read(names: tuple[str, ...], root: Path) -> tuple[bytes, dict[str, int]]:
    parts, sizes = [], {}
    for name in names:
        path = root / f"{name}.py"
        if path.is_file():
            parts.append(path.read_bytes())
            sizes[f"{name}.py"] = len(parts[-1])
    return b"\n".join(parts), sizes


def corpus(root: Path | None = None) -> dict[str, Any]:
    """The training and validation bytes (uint8 arrays) and what they are: files, sizes, SHA-256."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, train_sizes = _read(TRAIN_FILES, root)
    valid, valid_sizes = _read(VALIDATION_FILES, root)
    if not train or not valid:
        raise FileNotFoundError(f"the standard library's sources are not under {root}")
    return {
        "train": np.frombuffer(train, np.uint8), "validation": np.frombuffer(valid, np.uint8),
        "meta": {"root": str(root), "train_files": train_sizes, "validation_files": valid_sizes,
                 "train_bytes": len(train), "validation_bytes": len(valid),
                 "sha256": hashlib.sha256(train + b"\0" + valid).hexdigest()},
    }


def windows(data: np.ndarray, context: int, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (input, next-byte target) windows of `context` bytes; `count` evenly spaced ones if given."""
    n = (len(data) - 1) // context
    starts = np.arange(n) * context
    if count is not None and count < n:
        starts = starts[np.linspace(0, n - 1, count).round().astype(int)]
    index = starts[:, None] + np.arange(context)[None, :]
    return data[index].astype(np.int64), data[index + 1].astype(np.int64)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the decoder. `attention` (the Q/K/V width) and `mlp` default to width and 4 x width.

    Growing the residual stream by tiling keeps the attention and MLP widths (its readers take the
    copies' mean), so a width-grown child is a GPT whose stream is wider than its attention.
    """

    layers: int = 2
    width: int = 64
    heads: int = 4
    context: int = 64
    attention: int | None = None
    mlp: int | None = None

    @property
    def attention_width(self) -> int:
        return self.attention or self.width

    @property
    def mlp_width(self) -> int:
        return self.mlp or 4 * self.width


class _Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.scale = 1 / math.sqrt(c.attention_width // c.heads)
        self.ln1, self.ln2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.q, self.k, self.v = (nn.Linear(c.width, c.attention_width) for _ in range(3))
        self.proj = nn.Linear(c.attention_width, c.width)
        self.fc, self.out = nn.Linear(c.width, c.mlp_width), nn.Linear(c.mlp_width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        # Sizes are read from q, not from the stream x, and the head size is left to Reshape (-1): nothing
        # in the graph reads the stream's width as a number, so growing the stream needs no rewrite here.
        batch, length, _ = q.shape
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * self.scale
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        attention = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(batch, length, -1))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT: token and position embeddings, pre-norm blocks, final LayerNorm, linear head."""

    def __init__(self, config: GPTConfig, seed: int) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(VOCAB, config.width)
        self.positions = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, VOCAB)
        # GPT-2's initialisation: N(0, 0.02) weights and embeddings, zero biases, unit norms.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                if isinstance(module, nn.Linear):
                    module.bias.zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def export(model: GPT, opset: int = 17) -> onnx.ModelProto:
    """The model as ONNX (TorchScript exporter; batch and sequence axes dynamic; LayerNormalization fused)."""
    model = model.to("cpu").eval()
    buffer = io.BytesIO()
    example = torch.zeros(1, 8, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(model, (example,), buffer, input_names=["tokens"], output_names=["logits"],
                          dynamic_axes={"tokens": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
                          opset_version=opset, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def step_flops(module: nn.Module, batch: int, context: int) -> int:
    """FLOPs of one training step (forward and backward) on a batch, counted by torch's FlopCounterMode.

    It counts the matrix products (projections, attention scores and mixing, the head), which is
    what the literature counts; elementwise work and the optimiser are left out.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(module.parameters()).device
    tokens = torch.zeros(batch, context, dtype=torch.int64, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        lm_loss(module(tokens), tokens).backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
