"""Conflict-averse level 2 (CAGrad, Liu et al. 2021, as FedHCA2 uses it for encoders).

Task groups' encoder updates g_1..g_T may conflict: their plain weighted mean g0 = sum_i p_i g_i
can improve one task at another's expense. CAGrad picks the update d that maximises the WORST
group's improvement min_i <g_i, d> within a ball ||d - g0|| <= c ||g0|| around the mean. Its
dual is a small problem over the simplex that needs only the Gram matrix G_ij = <g_i, g_j>:

    w* = argmin_{w in simplex}  w^T G p + c ||g0|| sqrt(w^T G w)
    d  = (g0 + lambda g_w) / (1 + c^2),   g_w = sum_i w*_i g_i,   lambda = c ||g0|| / ||g_w||

so d is again a combination of the groups' updates, with coefficients (p + lambda w*) / (1 + c^2):
the streaming aggregator applies it with the same weighted sum as any other level-2 rule.
Everything here works on the T x T Gram matrix, never on the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

_ITERATIONS = 2000
_STEP = 0.05


def gram_matrix(deltas: Sequence[Mapping[str, np.ndarray]], keys: Sequence[str]) -> np.ndarray:
    """G_ij = sum over keys (in the given, sorted order) of <delta_i[key], delta_j[key]>, float64."""
    count = len(deltas)
    gram = np.zeros((count, count), dtype=np.float64)
    for key in keys:
        flat = [np.asarray(d[key], dtype=np.float64).ravel() for d in deltas]
        for i in range(count):
            for j in range(i, count):
                value = float(np.dot(flat[i], flat[j]))
                gram[i, j] += value
                if i != j:
                    gram[j, i] += value
    return gram


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (sort-based, exact)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    index = np.arange(1, len(v) + 1)
    rho = int(np.nonzero(u - cumulative / index > 0)[0][-1])
    theta = float(cumulative[rho]) / (rho + 1)
    projected: np.ndarray = np.maximum(v - theta, 0.0)
    return projected


def _objective(w: np.ndarray, gram: np.ndarray, base: np.ndarray, radius: float) -> float:
    return float(w @ gram @ base + radius * math.sqrt(max(float(w @ gram @ w), 0.0)))


def cagrad_weights(gram: np.ndarray, base: Sequence[float], c: float) -> list[float]:
    """Coefficients a_i such that d = sum_i a_i g_i is CAGrad's conflict-averse update.

    `base` are the level-2 weights p of the plain mean (uniform or by samples); c = 0 gives them
    back unchanged. Deterministic: projected gradient descent with a fixed step and iteration
    count on the scale-free (trace-normalised) dual, keeping the best iterate.
    """
    p = np.asarray(base, dtype=np.float64)
    if c < 0:
        raise ValueError(f"the CAGrad radius c must be 0 or more, got {c}")
    g0_sq = float(p @ gram @ p)
    scale = float(np.max(np.diag(gram))) if gram.size else 0.0
    if c == 0 or g0_sq <= 0.0 or scale <= 0.0:
        return [float(x) for x in p]
    g = gram / scale  # the minimiser does not depend on the scale of G
    radius = c * math.sqrt(g0_sq / scale)
    w = np.full(len(p), 1.0 / len(p))
    best_w, best_f = w, _objective(w, g, p, radius)
    for _ in range(_ITERATIONS):
        norm = math.sqrt(max(float(w @ g @ w), 1e-30))
        grad = g @ p + radius * (g @ w) / norm
        w = project_to_simplex(w - _STEP * grad)
        value = _objective(w, g, p, radius)
        if value < best_f:
            best_w, best_f = w, value
    gw_sq = float(best_w @ gram @ best_w)
    if gw_sq <= 1e-24 * g0_sq:
        # The zero update lies in the groups' hull: no direction improves them all. Keep the mean.
        return [float(x) for x in p]
    lam = c * math.sqrt(g0_sq) / math.sqrt(gw_sq)
    return [float(x) for x in (p + lam * best_w) / (1.0 + c * c)]
