"""The written checkpoint loaded back with transformers and compared with onnxruntime running the ONNX child.

Used by export_hf when transformers and torch are installed (neither is a dependency of onnxmorph:
they are imported here, only when a check runs). The child's inputs are drawn as `verify` draws
them and passed to the Hugging Face model by name; its output of the same name is compared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxmorph.errors import NotApplicable, UsageError, VerificationFailed
from onnxmorph.io import loading as mio
from onnxmorph.io import saving, streaming
from onnxmorph.limits import quote
from onnxmorph.verification import feeds

# Hugging Face's eager code and onnxruntime sum in different orders: the tolerance of test_grow_hf.py.
ATOL = 1e-4
RTOL = 1e-4
TRIALS = 2


def available() -> bool:
    """Whether transformers and torch can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def _session(model: onnx.ModelProto, folder: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    if mio.approx_size(model) < saving.EXTERNAL_DATA_THRESHOLD and not streaming.streams(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    target = Path(folder) / "child.onnx"
    mio.write_with_external_data(model, target)
    return ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])


def _load_hf(folder: Path, source: str | None = None) -> Any:
    """The written checkpoint in `folder` as the class its config.json names (`source`: where that config came from,
    for messages), refused in one line when the name is not a transformers model class of the config's family."""
    import transformers

    where = f"{source or folder}: config.json"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    names = config.get("architectures") or []
    name = names[0] if isinstance(names, list) and names else None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UsageError(f"{where} names no transformers model class in 'architectures' "
                         f"({quote(repr(config.get('architectures')), 80)}): cannot load it to compare "
                         "(--no-check skips the comparison)")
    family = getattr(getattr(cls, "config_class", None), "model_type", "")
    if family and family != config.get("model_type"):
        raise UsageError(f"{where} names {name}, a {family} class, in 'architectures', and model_type "
                         f"{quote(repr(config.get('model_type')), 40)}: not one family "
                         "(--no-check skips the comparison)")
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            # Eager attention: the reference code, the same function as the others.
            # Mismatched sizes are reported in `info` (below), naming the parameter and both shapes.
            model, info = cls.from_pretrained(str(folder), attn_implementation="eager", output_loading_info=True,
                                              ignore_mismatched_sizes=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever transformers raises on a folder it cannot load: not written)
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, a RuntimeError: the machine's limit, not the folder
            raise
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise VerificationFailed(f"transformers cannot load the written checkpoint as {name}: "
                                 f"{quote(first, 200)}") from exc
    finally:
        quiet.setLevel(level)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            raise VerificationFailed(f"transformers loads the written checkpoint with {kind.replace('_', ' ')}: "
                                     f"{', '.join(map(str, list(info[kind])[:3]))}")
    return model.eval()


def compare(folder: Path, child: onnx.ModelProto, child_name: str, seed: int = 0,
            source: str | None = None) -> dict[str, Any]:
    """Load `folder` with transformers and compare its output with the ONNX child's or raise VerificationFailed."""
    import torch

    model = _load_hf(folder, source)
    parameters = inspect.signature(model.forward).parameters
    inputs = [i.name for i in mio.true_inputs(child)]
    unknown = [name for name in inputs if name not in parameters]
    if unknown:
        raise NotApplicable(f"{child_name}: its input '{unknown[0]}' is no argument of {type(model).__name__}.forward: "
                            "cannot compare the checkpoint with the child (--no-check skips the comparison)")
    output = child.graph.output[0].name
    shapes = feeds.resolve_shapes(child, None)
    rng = np.random.default_rng(seed)
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="onnxmorph-export-hf-") as scratch:
        session = _session(child, scratch)
        for _ in range(TRIALS):
            feed = feeds.random_inputs(child, shapes, rng)
            expected = session.run([output], feed)[0]
            kwargs = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in feed.items()}
            if "use_cache" in parameters:
                kwargs["use_cache"] = False
            with torch.no_grad():
                result = model(**kwargs)
            got = getattr(result, output, None)
            if got is None:
                raise NotApplicable(f"{child_name}: its output '{output}' is not one of {type(model).__name__}'s "
                                    "outputs: cannot compare (--no-check skips the comparison)")
            got = got.float().numpy()
            if got.shape != expected.shape:
                raise VerificationFailed(f"the checkpoint's {output} is {list(got.shape)}, the child's "
                                         f"{list(expected.shape)}")
            error = np.abs(got - expected.astype(np.float32))
            bad = error > ATOL + RTOL * np.abs(expected)
            worst = max(worst, float(error.max(initial=0.0)))
            if bad.any():
                raise VerificationFailed(f"the checkpoint's {output} differ from the ONNX child's by up to "
                                         f"{worst:.3g} (tolerance {ATOL:g} + {RTOL:g} x |child|): nothing written")
    summary = (f"{type(model).__name__} from the written folder computes the child's {output} "
               f"(max |difference| {worst:.2g} over {TRIALS} input sets)")
    return {"class": type(model).__name__, "output": output, "trials": TRIALS, "max_abs_error": worst,
            "summary": summary}
