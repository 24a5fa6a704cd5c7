"""Tiny Hugging Face transformers built from configs (seeded random weights, no download), exported to ONNX.

`hf_export(kind, dynamo)` (a session fixture) exports one of `KINDS` with the current exporter
(`dynamo=True`, through onnxscript) or the TorchScript one (`dynamo=False`) once per test session
and returns an `HFModel`: the file, its inputs, and `logits(feed)`, the Hugging Face model's own
output for the same arrays. Measured on the 2-core CI machine: a TorchScript export takes 0.2-0.8 s,
a dynamo export 7-17 s, so the default run exports with dynamo only where a test needs it
(the dynamo sweeps are marked slow).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

KINDS = ("bert", "gpt2", "llama", "vit", "wav2vec2")
VOCAB = 100
HIDDEN = 32
LAYERS = 2
SEQUENCE = 8
IMAGE = 16


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

    def feed(self, seed: int = 0, batch: int = 2, sequence: int = SEQUENCE) -> dict[str, np.ndarray]:
        """Seeded inputs: ids in the vocabulary, masks of ones, pixels or 2*sequence audio samples in [-1, 1)."""
        rng = np.random.default_rng(seed)
        if self.kind == "vit":
            return {"pixel_values": rng.uniform(-1, 1, (batch, 3, IMAGE, IMAGE)).astype(np.float32)}
        if self.kind == "wav2vec2":
            return {"input_values": rng.uniform(-1, 1, (batch, 2 * sequence)).astype(np.float32)}
        feed = {"input_ids": rng.integers(0, VOCAB, (batch, sequence)).astype(np.int64),
                "attention_mask": np.ones((batch, sequence), np.int64)}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = rng.integers(0, 2, (batch, sequence)).astype(np.int64)
        return feed

    def logits(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        """The Hugging Face model's own logits for `feed` (arrays named like the ONNX inputs)."""
        with torch.no_grad():
            args = [torch.from_numpy(np.asarray(feed[name])) for name in self.input_names]
            return self.module(*args).numpy()


def _config_and_class(kind: str):  # -> (config, model class)
    common = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "intermediate_size": 2 * HIDDEN, "initializer_range": 0.1}
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
    raise ValueError(kind)


def build_module(kind: str, seed: int = 0):  # -> (torch.nn.Module, input names)
    """The HF model of `kind` with seeded random weights, wrapped to take positional inputs and return logits."""
    torch.manual_seed(seed)
    config, cls = _config_and_class(kind)
    model = cls(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # HF initialises norms to gamma 1, beta 0 (and the exporter then shares one tensor between
        # them); random ones make every norm and bias count in the comparisons.
        for name, param in model.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator) * 0.2
                param.copy_((1.0 + noise) if "norm" in name.lower() and "weight" in name else noise)
    if kind in ("vit", "wav2vec2"):
        name = "pixel_values" if kind == "vit" else "input_values"
        return _SignalLogits(model, name).eval(), (name,)
    names = ("input_ids", "attention_mask", "token_type_ids") if kind == "bert" else ("input_ids", "attention_mask")
    # eval() on the wrapper too: the TorchScript exporter restores the wrapper's mode on every submodule.
    return _TextLogits(model, len(names) == 3).eval(), names


class _TextLogits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, token_types: bool) -> None:
        super().__init__()
        self.model, self.token_types = model, token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {"token_type_ids": token_type_ids} if self.token_types else {"use_cache": False}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


class _SignalLogits(torch.nn.Module):
    """An image or audio model: one float input."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, signal):
        return self.model(**{self.name: signal}).logits


def export(kind: str, dynamo: bool, folder: Path, seed: int = 0) -> HFModel:
    """Build the tiny `kind` model and export it to `folder` with the dynamo or the TorchScript exporter."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    module, names = build_module(kind, seed)
    example = HFModel(kind, dynamo, Path(), module, names, 0.0).feed(seed=seed)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    path = folder / f"{kind}_{'dynamo' if dynamo else 'torchscript'}.onnx"
    dynamic = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"}) for n in names}
    if dynamo:  # dynamic_shapes are keyed by the forward's argument names
        dynamic = {("signal" if n in ("pixel_values", "input_values") else n): axes for n, axes in dynamic.items()}
    start = time.perf_counter()
    # The dynamo exporter prints its progress on stdout; keep it out of the tests' captured output.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "transformers", "onnxscript")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            if dynamo:
                dim = torch.export.Dim.DYNAMIC
                shapes = {n: {a: dim for a in axes} for n, axes in dynamic.items()}
                program = torch.onnx.export(module, args, input_names=list(names), output_names=["logits"],
                                            dynamo=True, dynamic_shapes=shapes, external_data=False,
                                            report=False, verify=False)
                program.save(str(path), external_data=False)
            else:
                torch.onnx.export(module, args, str(path), input_names=list(names), output_names=["logits"],
                                  dynamo=False, dynamic_axes=dynamic, opset_version=17)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
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
        if key not in _EXPORTS or not _EXPORTS[key].path.is_file():
            _EXPORTS[key] = export(kind, dynamo, tmp_path_factory.mktemp(f"hf_{kind}_{int(dynamo)}"))
        return _EXPORTS[key]

    return get
