"""`inspect`: a model's interface, its morphable layers, which morphs apply, and its history."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import onnx

from onnxmorph.analysis import attention as mattention
from onnxmorph.analysis import blocks as mblocks
from onnxmorph.analysis import experts as mexperts
from onnxmorph.contract import registry
from onnxmorph.errors import NotApplicable, OnnxMorphError
from onnxmorph.graph import core as mgraph
from onnxmorph.io import loading as mio
from onnxmorph.io import streaming
from onnxmorph.pipeline import receipt


def _value_info(info: onnx.ValueInfoProto) -> dict[str, Any]:
    tt = info.type.tensor_type
    dims: list[Any] = []
    for d in tt.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
    try:
        type_name = onnx.TensorProto.DataType.Name(tt.elem_type).lower()
    except ValueError:
        type_name = str(tt.elem_type)
    return {"name": info.name, "type": type_name, "shape": dims}


def inspect(model: onnx.ModelProto, source: str = "the model") -> dict[str, Any]:
    """Describe `model`: interface, opsets, morphable layers with per-morph applicability, history.

    A malformed receipt is refused (InvalidModelError naming `source`) before any other work.
    """
    history = receipt.history(model, source)
    model = mio.normalize(model)
    analysis = mgraph.Analysis(model)  # one view, one shape inference, shared by every probe
    modules = mblocks.node_modules(model)
    layers = []
    for info in mgraph.layers(analysis.view):
        morphs: dict[str, Any] = {}
        for name, cls in sorted(registry.load().items()):
            try:
                probe = cls.probe(analysis, info)
                if probe is None:
                    continue
                morphs[name] = {"applies": True, **probe.describe(probe.requires(analysis))}
            except NotApplicable as exc:
                morphs[name] = {"applies": False, "reason": str(exc)}
            except OnnxMorphError as exc:
                morphs[name] = {"applies": False, "reason": str(exc)}
        layers.append({
            "name": info.name,
            "output": info.output,
            "op": info.op,
            "weight": info.weight,
            "weight_shape": list(info.weight_shape),
            "module": modules.get(info.name),
            "morphs": morphs,
        })
        streaming.unmap_all()  # the probes read this layer's weights: their pages go (a model may exceed memory)
    found = mblocks.model_blocks(analysis)
    return {
        "ir_version": model.ir_version,
        "opsets": {(e.domain or "ai.onnx"): e.version for e in model.opset_import},
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "inputs": [_value_info(i) for i in mio.true_inputs(model)],
        "outputs": [_value_info(o) for o in model.graph.output],
        "nodes": len(model.graph.node),
        "layers": layers,
        "blocks": [{"after": b.index, "kind": b.kind, "norms": b.norms, "module": b.module, "output": b.output.name,
                    "parallel": b.parallel, "experts": b.experts, "top_k": b.top_k} for b in found],
        "attention": mattention.attention_modules(analysis, analysis.view, found),
        "experts": mexperts.summary(analysis),
        "history": history,
    }


def format_inspection(info: dict[str, Any], title: str = "model") -> str:
    """The text form of `inspect` output."""
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    lines = [f"{title}: IR {info['ir_version']}, opset {opsets}, {info['nodes']} nodes"
             + (f", made by {info['producer']}" if info["producer"] else "")]

    def shape(v: dict[str, Any]) -> str:
        return "x".join(str(d) for d in v["shape"]) or "scalar"

    for kind in ("inputs", "outputs"):
        lines.append(f"{kind}:")
        lines += [f"  {v['name']}  {v['type']}[{shape(v)}]" for v in info[kind]]
    lines += _layer_lines(info["layers"])
    lines += _transformer_lines(info)
    lines += _expert_lines(info.get("experts") or {})
    if info["history"]:
        lines.append(f"history ({len(info['history'])} morph run(s)):")
        for k, record in enumerate(info["history"], 1):
            steps = ", ".join(
                f"{s['pass']}(" + ", ".join(f"{a}={b!r}" for a, b in s["params"].items()) + ")"
                for s in record.get("steps", [])
            )
            ver = record.get("verification")
            if record.get("kind") == "train":  # a search's training run: it changes the function by design
                check = "trained, not a morph" + "".join(f", {k} {v:.4f}" for k, v in record.get("result", {}).items())
            elif ver:
                check = (f"verified {'PASS' if ver['passed'] else 'FAIL'}, max abs error "
                         f"{ver['max_abs_error']:.2e}, max rel error {ver['max_rel_error']:.2e}")
            else:
                check = "not verified"
            lines.append(f"  {k}. {steps}; {check}; parent sha256 {record.get('parent_sha256', '?')[:16]}")
    else:
        lines.append("history: none (not made by onnxmorph)")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "none"
    return str(value)


def reason_template(reason: str) -> str:
    """A reason with the names in it left out, so that the same refusal of many layers reads as one."""
    return re.sub(r"'[^']*'", "'…'", reason)


def _layer_lines(layers: list[dict[str, Any]]) -> list[str]:
    """The morphable layers; a refusal that several layers share is printed once at the end as [Rk]."""
    refusals = [v["reason"] for layer in layers for v in layer["morphs"].values() if not v["applies"]]
    counts = Counter(reason_template(r) for r in refusals)
    examples = {}
    for reason in refusals:
        examples.setdefault(reason_template(reason), reason)
    shared = {t: f"R{k}" for k, t in enumerate((t for t, n in counts.items() if n > 1), 1)}
    lines = [f"morphable layers ({len(layers)}):"]
    for layer in layers:
        weight = "x".join(map(str, layer["weight_shape"]))
        module = f"  module {layer['module']}" if layer.get("module") else ""
        lines.append(f"  {layer['name']}  {layer['op']}  weight {weight}  output {layer['output']}{module}")
        for name, verdict in layer["morphs"].items():
            if verdict["applies"]:
                extra = "; ".join(f"{k} {_short(v)}" for k, v in verdict.items() if k != "applies")
                lines.append(f"    {name}: yes" + (f" ({extra})" if extra else ""))
            else:
                key = shared.get(reason_template(verdict["reason"]))
                lines.append(f"    {name}: no, " + (f"[{key}]" if key else verdict["reason"]))
    if shared:
        lines.append("refusals shared by several layers (--json gives each in full):")
        for template, key in shared.items():
            lines.append(f"  [{key}] {counts[template]} times: {template}")
            lines.append(f"       e.g. {examples[template]}")
    return lines


def _transformer_lines(info: dict[str, Any]) -> list[str]:
    lines = []
    if info.get("blocks"):
        lines.append(f"transformer blocks ({len(info['blocks'])}; `block --after` takes the number or the module):")
        for b in info["blocks"]:
            where = b["module"] or f"output {b['output']}"
            shape = ("  parallel attention and MLP" if b.get("parallel") else "") + (
                f"  {b['experts']} experts, top {b['top_k'] or '?'}" if b.get("experts") else "")
            lines.append(f"  {b['after']}  {b['kind']}  {where}  norms: {', '.join(b['norms'])}{shape}"
                         + ("  (block: refused, post-norm)" if b["kind"] == "post-norm" else ""))
    if info.get("attention"):
        lines.append(f"attention ({len(info['attention'])}):")
        for a in info["attention"]:
            heads = f"{a['heads'] or '?'} heads x {a['head_dim'] or '?'}"
            if a["kv_heads"] is not None and a["kv_heads"] != a["heads"]:
                heads += f", {a['kv_heads']} key/value heads"
            lines.append(f"  block {a['block']}  {a['module'] or ''}  {heads}: query {a['query']}, key {a['key']}, "
                         f"value {a['value']}, output {a['output']}")
    return lines


def _expert_lines(experts: dict[str, Any]) -> list[str]:
    """FFNs that `moe` can upcycle and the mixtures of experts already in the model."""
    lines = []
    if experts.get("moes"):
        lines.append(f"mixtures of experts ({len(experts['moes'])}; `moe --layer` takes the module or block):")
        for m in experts["moes"]:
            where = f"block {m['block']}  " if m["block"] is not None else ""
            chosen = f"top-{m['top_k']}" if m["groups"] == 1 else \
                f"{m['top_k']} active (top-{m['top_k'] // m['groups']} in each of {m['groups']} routing groups)"
            lines.append(f"  {where}{m['name']}: {m['experts']} experts, {chosen}, {m['routing']} routing, router "
                         f"{', '.join(m['routers'])}")
            if m["expert_weights"]:
                lines.append("    experts stacked in " + ", ".join(
                    f"{w['name']} [{'x'.join(map(str, w['shape']))}]" for w in m["expert_weights"]))
            for k, e in enumerate(m["experts_list"]):
                lines.append(f"    expert {k}: {e['hidden']} hidden units, down projection {e['down']}")
            for e in m.get("shared", []):
                lines.append(f"    shared expert (always active): {e['hidden']} hidden units, down projection "
                             f"{e['down']}")
    if experts.get("ffns"):
        lines.append(f"feed-forward sublayers ({len(experts['ffns'])}; `moe --layer` upcycles one into experts):")
        for f in experts["ffns"]:
            where = f"block {f['block']}  " if f["block"] is not None else ""
            lines.append(f"  {where}{f['name']}: {f['hidden']} hidden units ({', '.join(f['activations'])}), "
                         f"{' + '.join(f['inner'])} -> {f['down']}")
    return lines
