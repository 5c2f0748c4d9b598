"""An independent recomputation of a round's global model, in plain numpy.

It reads the tensors with the `safetensors` library (not mfed's codec) and applies M-Fed's two
levels as MFED.md states them: per task group, the sample-weighted mean of encoder deltas and
of decoders; across task groups, the (uniform or sample-weighted) mean of the groups' mean
deltas for the keys shared across tasks (`encoder.*` in the global model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as load_safetensors


@dataclass(frozen=True)
class Contribution:
    task: str
    samples: int
    delta: Mapping[str, np.ndarray]  # site keys: encoder.<p>
    decoder: Mapping[str, np.ndarray]  # site keys: decoder.<p>


def tensors(data: bytes) -> dict[str, np.ndarray]:
    return dict(load_safetensors(data))


def expected_global(
    base: Mapping[str, np.ndarray], contributions: Sequence[Contribution], weighting: str = "uniform"
) -> dict[str, np.ndarray]:
    groups: dict[str, list[Contribution]] = {}
    for c in contributions:
        groups.setdefault(c.task, []).append(c)
    mean_delta: dict[str, dict[str, np.ndarray]] = {}
    mean_decoder: dict[str, dict[str, np.ndarray]] = {}
    sizes: dict[str, int] = {}
    for task, members in groups.items():
        total = sum(c.samples for c in members)
        sizes[task] = total
        mean_delta[task] = {
            k: sum(c.samples * c.delta[k].astype(np.float64) for c in members) / total for k in members[0].delta
        }
        mean_decoder[task] = {
            k: sum(c.samples * c.decoder[k].astype(np.float64) for c in members) / total for k in members[0].decoder
        }
    tasks = sorted(groups)
    if weighting == "uniform":
        weights = {t: 1.0 / len(tasks) for t in tasks}
    else:
        grand = sum(sizes.values())
        weights = {t: sizes[t] / grand for t in tasks}
    out: dict[str, np.ndarray] = {}
    for key, value in base.items():
        if key.startswith("encoder."):
            shared = sum(weights[t] * mean_delta[t][key] for t in tasks)
            out[key] = (value.astype(np.float64) + shared).astype(np.float32)
            continue
        _, task, part, rest = key.split(".", 3)
        if task not in groups:
            out[key] = value.astype(np.float32)
        elif part == "encoder":
            out[key] = (value.astype(np.float64) + mean_delta[task][f"encoder.{rest}"]).astype(np.float32)
        else:
            out[key] = mean_decoder[task][f"decoder.{rest}"].astype(np.float32)
    return out


def assert_models_equal(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].dtype == np.float32, key
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
