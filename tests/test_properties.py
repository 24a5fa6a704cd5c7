"""Property tests: random sequences of morphs on the reference models verify or are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import REFERENCE_MODELS, sample_layers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robust_support import PASSES, applicable, reference

import onnxmorph
from onnxmorph.contract.passinfra import MorphPass, layer_name
from onnxmorph.contract.registry import REGISTRY
from onnxmorph.graph import core as mgraph
from onnxmorph.pipeline.run import VerifyOptions, run_passes
from onnxmorph.verification.verifier import Verifier

# --------------------------------------------------------------------------- the parent is never touched


def _fresh(stem: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(reference(stem))
    return model


PAIRS = [(name, stem) for name in PASSES for stem in REFERENCE_MODELS]


@pytest.mark.parametrize(("name", "stem"), PAIRS)
def test_a_pass_leaves_its_parent_byte_for_byte_unchanged(name: str, stem: str) -> None:
    parent = _fresh(stem)
    before = parent.SerializeToString(deterministic=True)
    steps = applicable(name, parent)
    picked = sample_layers(list(range(len(steps))), 2, seed=len(stem))
    for k in picked:
        result = steps[k](parent)
        assert result.model is not parent
        assert parent.SerializeToString(deterministic=True) == before, f"{steps[k]!r} changed its parent"
        # And the child really differs (a pass that silently does nothing would pass the check above).
        assert result.model.SerializeToString(deterministic=True) != before


# --------------------------------------------------------------------------- random sequences


def _perturb(step: MorphPass, rng: np.random.Generator, wild: bool) -> dict[str, Any]:
    """The step's parameters, with numbers nudged (`wild`: possibly to invalid values) and choices redrawn."""
    config = dict(step.config)
    for p in step.params:
        value = config.get(p.name)
        if p.parse is layer_name or value is None or rng.random() < 0.4:
            continue
        if p.choices:
            config[p.name] = str(rng.choice(list(p.choices)))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            low = -3 if wild else 0
            config[p.name] = int(value + rng.integers(low, 4))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
            low = -3 if wild else 0
            config[p.name] = [int(v + rng.integers(low, 4)) for v in value]
    return config


def _one_line_refusal(exc: BaseException) -> None:
    assert isinstance(exc, onnxmorph.OnnxMorphError), f"{type(exc).__name__}: {exc}"
    assert not isinstance(exc, onnxmorph.VerificationFailed), f"a pass broke the function: {exc}"
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    assert exc.exit_code == 2


def _random_sequence(stem: str, length: int, seed: int) -> tuple[onnx.ModelProto, list[dict[str, Any]], int]:
    """Apply up to `length` random morphs; returns the child, the applied steps and the refusals."""
    rng = np.random.default_rng(seed)
    child = reference(stem)
    applied: list[dict[str, Any]] = []
    refused = 0
    for _ in range(length):
        name = str(rng.choice(PASSES))
        wild = rng.random() < 0.3
        if wild:
            # Any layer, even one the pass does not apply to.
            layers = mgraph.layers(mgraph.read_view(child))
            info = layers[int(rng.integers(len(layers)))]
            try:
                probe = REGISTRY[name].probe(child, info)
            except onnxmorph.OnnxMorphError as exc:
                _one_line_refusal(exc)
                refused += 1
                continue
        else:
            candidates = applicable(name, child)
            probe = candidates[int(rng.integers(len(candidates)))] if candidates else None
        if probe is None:
            continue
        config = _perturb(probe, rng, wild)
        try:
            step = REGISTRY[name](**config)
            outcome = run_passes(child, [step], VerifyOptions(trials=1, seed=int(rng.integers(1000))))
        except Exception as exc:  # noqa: BLE001  (the property is about what is raised)
            _one_line_refusal(exc)
            refused += 1
            continue
        assert outcome.report is not None and outcome.report.passed
        child = outcome.child
        applied.append({"pass": name, "params": json.loads(json.dumps(dict(step.config), default=list))})
    return child, applied, refused


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(stem=st.sampled_from(REFERENCE_MODELS), length=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_random_morph_sequences_verify_or_are_refused_in_one_line(stem: str, length: int, seed: int) -> None:
    parent = reference(stem)
    child, applied, refused = _random_sequence(stem, length, seed)
    assert len(applied) + refused <= length
    # The composed child computes the original parent's function...
    if applied:
        report = Verifier(parent, trials=1, seed=seed % 1000).check(child)
        assert report, report.summary()
    # ...and its receipt lists every step, in order, with its parameters.
    history = onnxmorph.history(child)[len(onnxmorph.history(parent)):]
    recorded = [step for record in history for step in record["steps"]]
    assert recorded == applied
    for record in history:
        assert record["verification"]["passed"] is True and record["parent_sha256"]


def test_sequences_over_every_reference_model_apply_most_steps(tmp_path: Path) -> None:
    # A seeded sweep: every model gets a sequence of 3, most steps apply, and the saved child
    # keeps its receipt through a save and a load.
    total_applied = 0
    for k, stem in enumerate(REFERENCE_MODELS):
        child, applied, _ = _random_sequence(stem, 3, seed=1000 + k)
        total_applied += len(applied)
        path = tmp_path / f"{stem}.onnx"
        onnxmorph.save(child, path)
        assert onnxmorph.history(onnxmorph.load(path)) == onnxmorph.history(child)
    assert total_applied >= len(REFERENCE_MODELS)
