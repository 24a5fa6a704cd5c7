"""Transformer width: hidden (residual-stream) width through LayerNorm, RMSNorm and their decomposed forms by
tiling, more attention heads, and gated FFNs.

Tiling: net2net and lemon at an integer factor copy every channel of the stream equally, so each
norm sees the copy's mean, variance and mean square; gamma and beta are copied alike and the
readers share each channel's weights among its copies. Every child is verified in onnxruntime.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
import onnx.parser
import pytest
from conftest import parsed_model
from onnx import numpy_helper

import onnxmorph
from onnxmorph.errors import NotApplicable

torch = pytest.importorskip("torch")
nn = torch.nn


class RMSNorm(nn.Module):
    """Llama's RMSNorm as its modelling code writes it (exported decomposed: Pow, ReduceMean, Add, Sqrt, Div)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TinyLM(nn.Module):
    """A pre-norm decoder block: embeddings, attention, a gated (SwiGLU) FFN, a final norm and a head."""

    def __init__(self, d: int = 16, heads: int = 2, ff: int = 24, vocab: int = 40, rms: bool = False,
                 fused: bool = True) -> None:
        super().__init__()
        norm = RMSNorm if rms else nn.LayerNorm
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, 8, d) * 0.1)
        self.ln1, self.ln2, self.lnf = norm(d), norm(d), norm(d)
        self.qkv = nn.Linear(d, 3 * d) if fused else nn.ModuleList([nn.Linear(d, d) for _ in range(3)])
        self.o, self.heads = nn.Linear(d, d), heads
        self.gate, self.up, self.down = nn.Linear(d, ff), nn.Linear(d, ff), nn.Linear(ff, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos
        b, t, d = x.shape
        y = self.ln1(x)
        qkv = self.qkv(y).split(d, -1) if isinstance(self.qkv, nn.Linear) else [f(y) for f in self.qkv]
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in qkv)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        y = self.ln2(x)
        x = x + self.down(nn.functional.silu(self.gate(y)) * self.up(y))
        return self.head(self.lnf(x))


@functools.cache
def _tiny(dynamo: bool, **options: object) -> onnx.ModelProto:
    """TinyLM(**options), seeded, exported once per session."""
    torch.manual_seed(2)
    return _export(TinyLM(**options), dynamo=dynamo)


def _export(module: nn.Module, dynamo: bool) -> onnx.ModelProto:
    torch.manual_seed(0)
    module.eval()
    ids = torch.randint(0, 40, (2, 8))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            model = torch.onnx.export(module, (ids,), dynamo=True, verbose=False).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(module, (ids,), buffer, dynamo=False, opset_version=17)
            model = onnx.load_from_string(buffer.getvalue())
    return onnxmorph.normalize(model)


def _layer(model: onnx.ModelProto, weight_name: str) -> str:
    """The MatMul/Gemm layer whose weight was the torch parameter `weight_name` (names differ per exporter)."""
    from onnxmorph.graph import core as mgraph

    view = mgraph.read_view(model)
    for info in mgraph.layers(view):
        if weight_name in info.name or weight_name in info.weight or weight_name.replace(".", "/") in info.name:
            return info.name
    raise AssertionError(f"no layer for {weight_name}: {[i.name for i in mgraph.layers(view)]}")


def _widened(model: onnx.ModelProto, layer: str, width: int, method: str) -> onnx.ModelProto:
    child = onnxmorph.widen(model, layer=layer, width=width, method=method, verify=False)
    report = onnxmorph.verify(model, child, trials=2)
    assert report, report.summary()
    return child


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_hidden_width_tiles_the_stream(rms: bool) -> None:
    torch.manual_seed(1)
    module = TinyLM(rms=rms)
    model = _export(module, dynamo=False)
    writer = _layer(model, "/o/")  # the attention output projection writes the residual stream
    onnxmorph.widen(model, layer=writer, width=32, method="net2net", noise=0.1)  # symmetry broken, still exact
    for method in ("net2net", "lemon"):
        child = _widened(model, writer, 32, method)
        arrays = {t.name: numpy_helper.to_array(t) for t in child.graph.initializer}
        assert any(a.shape == (40, 32) for a in arrays.values())  # the embedding table is tiled
    # the child's logits are the torch model's own on the same ids
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(0, 40, size=(2, 8))
    session = ort.InferenceSession(child.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(NotApplicable, match="exact only when the channels are tiled"):
        onnxmorph.get_pass("widen")(layer=writer, width=24).requires(model)
    # 1.5x: average expansion (the new channels carry the stream's mean under LayerNorm, 0 under RMSNorm)
    child = _widened(model, writer, 24, "net2net")
    _widened(model, writer, 40, "lemon")
    if rms:  # the decomposed RMSNorm's epsilon (an Add constant) scaled by s = 16/24
        eps = sorted(float(numpy_helper.to_array(t).reshape(-1)[0]) for t in child.graph.initializer
                     if numpy_helper.to_array(t).size == 1)
        assert any(e == pytest.approx(1e-6 * 16 / 24) for e in eps), eps


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_gated_ffn_and_hidden_width_on_both_exporters(dynamo: bool) -> None:
    model = _tiny(dynamo)
    from onnxmorph.graph import core as mgraph

    names = [info.name for info in mgraph.layers(mgraph.read_view(model))]
    gate, up, down = names[2], names[3], names[4]  # after qkv and o: the FFN's gate, up and down projections
    for layer in (gate, up):  # the gate and up projections grow together (their product is elementwise)
        child = _widened(model, layer, 36, "netmorph")
        dims = sorted(tuple(t.dims) for t in child.graph.initializer if len(t.dims) == 2)
        assert dims.count((16, 36)) == 2 and (36, 16) in dims
    _widened(model, down, 48, "net2net")  # the FFN's writer: the whole stream triples


def test_convnext_widens_every_layer_by_tiling() -> None:
    """ConvNeXt's LayerNorm over the channels refuses netmorph; tiling (net2net x2) verifies on every layer."""
    import cnn_zoo

    from onnxmorph.graph import core as mgraph

    model = cnn_zoo.build("convnext", dynamo=False)
    widen = onnxmorph.get_pass("widen")
    verified = 0
    for info in mgraph.layers(mgraph.read_view(model))[:-1]:  # the last is the classifier
        old = info.weight_shape[0] if info.op == "Conv" else info.weight_shape[-1]
        child = widen(layer=info.name, width=2 * old, method="net2net", seed=1).apply(model).model
        report = onnxmorph.verify(model, child, trials=1)
        assert report, (info.name, report.summary())
        verified += 1
    assert verified == 11


def test_layer_norm_text_model_with_embedding() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (int64[2, 5] ids) => (float[2, 5, 7] y) {
    e = Gather(table, ids)
    h = MatMul(e, w1)
    s = Add(e, h)
    n = LayerNormalization<axis=-1, epsilon=0.001>(s, gamma, beta)
    y = MatMul(n, head)
    }"""
    rng = np.random.default_rng(3)
    arrays = {"table": rng.normal(size=(11, 6)), "w1": rng.normal(size=(6, 6)), "gamma": rng.random(6) + 0.5,
              "beta": rng.normal(size=6), "head": rng.normal(size=(6, 7))}
    model = parsed_model(text, arrays)
    for width, method in ((12, "net2net"), (18, "lemon"), (9, "net2net"), (16, "lemon")):
        child = _widened(model, "h", width, method)
        grown = {t.name: numpy_helper.to_array(t) for t in child.graph.initializer}
        assert grown["table"].shape == (11, width) and grown["head"].shape == (width, 7)
        s = width // 6 * 6 / width  # average expansion scales the variance by s: gamma by sqrt(s), epsilon by s
        np.testing.assert_allclose(grown["gamma"][:6], arrays["gamma"] * np.sqrt(s), rtol=1e-6)
        eps = next(a.f for n in child.graph.node if n.op_type == "LayerNormalization" for a in n.attribute
                   if a.name == "epsilon")
        assert eps == pytest.approx(0.001 * s)


def test_post_norm_stream_tiles_but_does_not_average() -> None:
    """BERT's post-norm blocks: the stream is a LayerNorm's output, so its mean channels would not stay means."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (int64[2, 5] ids) => (float[2, 5, 7] y) {
    e = Gather(table, ids)
    h = MatMul(e, w1)
    s = Add(e, h)
    n = LayerNormalization<axis=-1>(s, gamma, beta)
    h2 = MatMul(n, w2)
    s2 = Add(n, h2)
    n2 = LayerNormalization<axis=-1>(s2, gamma2, beta2)
    y = MatMul(n2, head)
    }"""
    rng = np.random.default_rng(4)
    arrays = {"table": rng.normal(size=(11, 6)), "w1": rng.normal(size=(6, 6)), "w2": rng.normal(size=(6, 6)),
              "gamma": rng.random(6) + 0.5, "beta": rng.normal(size=6), "gamma2": rng.random(6) + 0.5,
              "beta2": rng.normal(size=6), "head": rng.normal(size=(6, 7))}
    model = parsed_model(text, arrays)
    _widened(model, "h", 12, "net2net")
    with pytest.raises(NotApplicable, match="post-norm"):
        onnxmorph.get_pass("widen")(layer="h", width=9, method="net2net").requires(model)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_attention_heads_grow_with_fused_qkv(dynamo: bool) -> None:
    """Widening the fused QKV projection by whole heads: one new head each for Q, K and V (head size 8); the
    reshapes that split and merge the heads are rewritten and the output projection reads the new head with 0."""
    model = _tiny(dynamo)
    from onnxmorph.graph import core as mgraph

    layers = mgraph.layers(mgraph.read_view(model))
    qkv, out = layers[0].name, layers[1]
    child = _widened(model, qkv, 72, "netmorph")
    w_out = next(numpy_helper.to_array(t) for t in child.graph.initializer if t.name == out.weight)
    assert w_out.shape == (24, 16) and not w_out[16:].any()
    with pytest.raises(NotApplicable, match="a multiple of 8"):
        onnxmorph.get_pass("widen")(layer=qkv, width=60).requires(model)


def test_attention_heads_grow_with_separate_projections() -> None:
    """Widening Q by a head gives K and V the same head (scores and values are per head): all three grow."""
    model = _tiny(False, fused=False, heads=4)
    from onnxmorph.graph import core as mgraph

    layers = mgraph.layers(mgraph.read_view(model))
    q, k, v, out = layers[0], layers[1], layers[2], layers[3]
    child = _widened(model, q.name, 20, "netmorph")  # head size 4: one new head
    dims = {t.name: tuple(t.dims) for t in child.graph.initializer}
    assert dims[k.weight] == (16, 20) and dims[v.weight] == (16, 20) and dims[out.weight] == (20, 16)
    _widened(model, v.name, 24, "netmorph")


class GroupedQueryAttention(nn.Module):
    """Llama's attention with 4 query heads sharing 2 key/value heads (repeat_kv: expand and reshape)."""

    def __init__(self, d: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.q, self.o = nn.Linear(d, heads * self.hd), nn.Linear(heads * self.hd, d)
        self.k, self.v = nn.Linear(d, kv_heads * self.hd), nn.Linear(d, kv_heads * self.hd)
        self.fc = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k, v = (f(x).view(b, t, self.kv, self.hd).transpose(1, 2) for f in (self.k, self.v))
        k, v = (z[:, :, None].expand(b, self.kv, self.h // self.kv, t, self.hd).reshape(b, self.h, t, self.hd)
                for z in (k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.hd ** 0.5, -1) @ v
        return self.fc(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_grouped_query_attention_grows_whole_groups() -> None:
    """New query heads come in whole groups with one new key/value head; a new key/value head brings its group."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(5)
    module = GroupedQueryAttention().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = onnxmorph.normalize(torch.onnx.export(module, (torch.randn(2, 6, 16),), dynamo=True).model_proto)
    from onnxmorph.graph import core as mgraph

    q, k, v = (info for info in mgraph.layers(mgraph.read_view(model))[:3])
    child = _widened(model, q.name, 24, "netmorph")  # 2 new query heads: one new group
    dims = {t.name: tuple(t.dims) for t in child.graph.initializer}
    assert dims[k.weight][-1] == dims[v.weight][-1] == 12
    _widened(model, k.name, 12, "netmorph")
    with pytest.raises(NotApplicable, match="a multiple of 2"):
        onnxmorph.get_pass("widen")(layer=q.name, width=20).requires(model)


def test_onnxruntime_fused_skip_norms_tile() -> None:
    """SkipLayerNormalization and SkipSimplifiedLayerNormalization (com.microsoft, written by onnxruntime's
    transformer optimiser): the residual sum (output 3) is the stream, output 0 its norm."""
    text = """<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
    g (int64[2, 5] ids) => (float[2, 5, 7] y) <float[2, 5, 6] n, float[2, 5, 6] s, float[2, 5, 6] r> {
    e = Gather(table, ids)
    h = MatMul(e, w1)
    n, mu, inv, s = com.microsoft.SkipLayerNormalization<epsilon=0.001>(e, h, gamma, beta)
    h2 = MatMul(n, w2)
    r, mu2, inv2, s2 = com.microsoft.SkipSimplifiedLayerNormalization<epsilon=0.001>(s, h2, gamma2)
    y = MatMul(r, head)
    }"""
    rng = np.random.default_rng(5)
    arrays = {"table": rng.normal(size=(11, 6)), "w1": rng.normal(size=(6, 6)), "w2": rng.normal(size=(6, 6)),
              "gamma": rng.random(6) + 0.5, "beta": rng.normal(size=6), "gamma2": rng.random(6) + 0.5,
              "head": rng.normal(size=(6, 7))}
    model = parsed_model(text, arrays)
    for layer in ("h", "h2"):
        _widened(model, layer, 12, "net2net")
        _widened(model, layer, 18, "lemon")
    with pytest.raises(NotApplicable, match="SkipSimplifiedLayerNormalization 'r' is neither a LayerNorm"):
        onnxmorph.get_pass("widen")(layer="h", width=9, method="net2net").requires(model)


class BatchedHeadsAttention(nn.Module):
    """Attention as exporters decompose scaled_dot_product_attention: heads merged with the batch for bmm."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.h, self.hd).transpose(1, 2).reshape(b * self.h, t, self.hd)
                   for f in (self.q, self.k, self.v))
        a = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) / self.hd ** 0.5, -1), v)
        a = a.reshape(b, self.h, t, self.hd).transpose(1, 2).reshape(b, t, d)
        return self.fc(x + self.o(a))


@pytest.mark.parametrize("width", [20, 32])
def test_heads_merged_with_the_batch_grow(width: int) -> None:
    """[B, H, T, d] -> [B*H, T, d]: the new heads repeat in every batch element of the merged axis."""
    torch.manual_seed(6)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(BatchedHeadsAttention().eval(), (torch.randn(2, 6, 16),), buffer, dynamo=False)
    model = onnxmorph.normalize(onnx.load_from_string(buffer.getvalue()))
    from onnxmorph.graph import core as mgraph

    q, k, v = (info for info in mgraph.layers(mgraph.read_view(model))[:3])
    child = _widened(model, q.name, width, "netmorph")
    dims = {t.name: tuple(t.dims) for t in child.graph.initializer}
    assert dims[k.weight][-1] == dims[v.weight][-1] == width
