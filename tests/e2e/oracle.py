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


def cagrad_by_grid(deltas: Sequence[Mapping[str, np.ndarray]], c: float, steps: int = 20001) -> list[float]:
    """CAGrad's level-2 coefficients for TWO groups with uniform base weights, by brute force.

    Independent of mfed's solver: the dual min_w <g_w, g0> + c ||g0|| ||g_w|| over the simplex
    is searched on a grid of w1 in [0, 1]; d = (g0 + lambda g_w) / (1 + c^2) with
    lambda = c ||g0|| / ||g_w||, returned as the coefficients of g_1 and g_2 in d."""
    keys = sorted(deltas[0])
    g = [np.concatenate([d[k].astype(np.float64).ravel() for k in keys]) for d in deltas]
    g0 = 0.5 * g[0] + 0.5 * g[1]
    w1 = np.linspace(0.0, 1.0, steps)
    dot = [float(g[i] @ g0) for i in (0, 1)]
    g11, g12, g22 = float(g[0] @ g[0]), float(g[0] @ g[1]), float(g[1] @ g[1])
    gw_norm = np.sqrt(np.maximum(w1**2 * g11 + 2 * w1 * (1 - w1) * g12 + (1 - w1) ** 2 * g22, 0.0))
    objective = w1 * dot[0] + (1 - w1) * dot[1] + c * np.linalg.norm(g0) * gw_norm
    best = float(w1[int(np.argmin(objective))])
    gw_best = best * g[0] + (1.0 - best) * g[1]
    lam = c * float(np.linalg.norm(g0)) / float(np.linalg.norm(gw_best))
    return [(0.5 + lam * best) / (1 + c * c), (0.5 + lam * (1.0 - best)) / (1 + c * c)]


@dataclass(frozen=True)
class TwoTrackContribution:
    """A site that trained both tracks: the task track from E_tau + startMix (E_G - E_tau) and
    the shared track from E_G; both encoder deltas and decoders sit in the same two files."""

    task: str
    samples: int
    start_mix: float
    delta: Mapping[str, np.ndarray]  # encoder.<p> (task track) and shared.encoder.<p>
    decoder: Mapping[str, np.ndarray]  # decoder.<p> (task track) and shared.decoder.<p>


def expected_global_two_track(
    base: Mapping[str, np.ndarray], contributions: Sequence[TwoTrackContribution], weights: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """docs/strategies.md: E_G moves by sum_g w_g (group mean of shared-track deltas);
    E_tau' = E_tau + a_tau (E_G - E_tau) + group mean of task-track deltas; D_tau = mean decoder."""
    groups: dict[str, list[TwoTrackContribution]] = {}
    for c in contributions:
        groups.setdefault(c.task, []).append(c)

    def mean(members: Sequence[TwoTrackContribution], pick: str, key: str) -> np.ndarray:
        total = sum(c.samples for c in members)
        return sum(c.samples * getattr(c, pick)[key].astype(np.float64) for c in members) / total

    out: dict[str, np.ndarray] = {}
    for key, value in base.items():
        v = value.astype(np.float64)
        if key.startswith("encoder."):
            moved = v + sum(weights[t] * mean(m, "delta", "shared." + key) for t, m in groups.items())
            out[key] = moved.astype(np.float32)
            continue
        _, task, part, rest = key.split(".", 3)
        members = groups.get(task)
        if members is None:
            out[key] = value.astype(np.float32)
        elif part == "encoder":
            total = sum(c.samples for c in members)
            a = sum(c.samples * c.start_mix for c in members) / total
            shared = base.get(f"encoder.{rest}")
            start = v if shared is None else v + a * (shared.astype(np.float64) - v)
            out[key] = (start + mean(members, "delta", f"encoder.{rest}")).astype(np.float32)
        else:
            out[key] = mean(members, "decoder", f"decoder.{rest}").astype(np.float32)
    return out
