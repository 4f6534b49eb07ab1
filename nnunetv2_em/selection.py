"""Which unlabeled cases to label next: scores on case embeddings. Pure array functions (numpy, no file I/O).

EXAMINE (Huang, Lei, Li; DALI @ MICCAI 2022, arXiv 2209.14434) scores a case by how much the largest singular value
of the embedding matrix drops when the case is left out: ``msv_i = σ₁(Z) − σ₁(Z without row i)`` (``>= 0`` by
interlacing), reported as ``exp(msv_i)`` (the "exponential marginal singular value"; any increasing transform ranks
the same). Leaving out row ``z_i`` is a rank-one downdate of ``ZᵀZ``, so one thin SVD ``Z = U S Vᵀ`` gives every
case's ``σ₁(Z without row i)²`` as the largest root of the secular equation
``1 − Σ_k w_ik² / (s_k² − μ) = 0`` with ``w_ik = s_k u_ik`` (the root lies in ``(s_2², s_1²]``, where the left side
decreases), found for all cases at once by bisection.
"""

from __future__ import annotations

import numpy as np

_BISECTION_STEPS = 64  # halves (s_1² - s_2²) to below float64 resolution


def _check_embeddings(embeddings) -> np.ndarray:
    z = np.asarray(embeddings, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"embeddings must be a non-empty (cases, features) array, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("embeddings contain NaN or inf")
    return z


def normalize_rows(embeddings) -> np.ndarray:
    """Each case's embedding scaled to unit length (all-zero rows stay zero), so no case weighs by its norm.

    Args:
        embeddings: ``(N, D)``.
    """
    z = _check_embeddings(embeddings)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.where(norms > 0, z / np.where(norms > 0, norms, 1.0), 0.0)


def leave_one_out_top_singular_values(embeddings, *, exact: bool = False) -> np.ndarray:
    """``σ₁`` of the embedding matrix without each row in turn.

    Args:
        embeddings: ``(N, D)``.
        exact: one SVD per left-out row (``O(N · min(N, D)² · max(N, D))``: a reference for small N); default:
            one thin SVD and a vectorised bisection on the rank-one secular equation.

    Returns:
        ``(N,)`` float64; 0 for the only row of a one-row matrix.
    """
    z = _check_embeddings(embeddings)
    n = z.shape[0]
    if n == 1:
        return np.zeros(1)
    if exact:
        return np.array([np.linalg.norm(np.delete(z, i, axis=0), ord=2) for i in range(n)])
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    keep = s > s[0] * 1e-12 if s[0] > 0 else np.zeros_like(s, bool)
    if not keep.any():
        return np.zeros(n)
    u, s = u[:, keep], s[keep]
    eigenvalues = s ** 2
    w2 = (u * s) ** 2  # (N, K): squared coordinates of each row in the right singular basis
    low = np.full(n, eigenvalues[1] if eigenvalues.size > 1 else 0.0)
    high = np.full(n, eigenvalues[0])
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        with np.errstate(divide="ignore", invalid="ignore"):
            secular = 1.0 - np.sum(w2 / (eigenvalues[None] - middle[:, None]), axis=1)
        # the secular function decreases on (λ2, λ1): positive means the root lies above
        above = secular > 0
        low = np.where(above, middle, low)
        high = np.where(above, high, middle)
    roots = 0.5 * (low + high)
    roots = np.where(w2[:, 0] <= eigenvalues[0] * 1e-30, eigenvalues[0], roots)  # orthogonal to v1: σ₁ stays
    return np.sqrt(np.maximum(roots, 0.0))


def examine_scores(embeddings, *, normalize: bool = True, exact: bool = False) -> np.ndarray:
    """EXAMINE score per case: ``exp(σ₁(Z) − σ₁(Z without row i))``; the higher, the more the case carries the
    dataset's dominant direction of variation. Invariant to the order of the rows (each score follows its row)
    and, with ``normalize`` (unit-length rows first, the default), to any scaling of the embeddings.

    Args:
        embeddings: ``(N, D)`` one pooled embedding per case. exact: see ``leave_one_out_top_singular_values``.

    Returns:
        ``(N,)`` float64, each ``>= 1``.
    """
    z = normalize_rows(embeddings) if normalize else _check_embeddings(embeddings)
    top = np.linalg.norm(z, ord=2)
    marginal = np.maximum(top - leave_one_out_top_singular_values(z, exact=exact), 0.0)
    return np.exp(marginal)


def k_center_greedy(embeddings, count: int, *, selected=(), normalize: bool = True) -> list[int]:
    """The diversity baseline (core-set): repeatedly take the case farthest from every case taken so far.

    Args:
        embeddings: ``(N, D)``. count: cases to add. selected: indices already labelled (the first pick is the
            farthest from them; without any, the case farthest from the mean).

    Returns:
        ``count`` new row indices in the order taken.
    """
    z = normalize_rows(embeddings) if normalize else _check_embeddings(embeddings)
    n = z.shape[0]
    selected = [int(i) for i in selected]
    if count < 0 or count > n - len(set(selected)):
        raise ValueError(f"count {count}: between 0 and the {n - len(set(selected))} cases not selected yet")
    if selected:
        distance = np.min(np.linalg.norm(z[:, None] - z[selected][None], axis=2), axis=1)
    else:
        distance = np.linalg.norm(z - z.mean(axis=0), axis=1)
    distance[selected] = -np.inf
    taken = []
    for _ in range(count):
        pick = int(np.argmax(distance))
        taken.append(pick)
        distance = np.minimum(distance, np.linalg.norm(z - z[pick], axis=1))
        distance[[*selected, *taken]] = -np.inf
    return taken


def mean_entropy(probabilities, *, mask=None) -> float:
    """Predictive entropy of a case (nats), averaged over its voxels (``mask``: only those): the uncertainty
    strategy nnActive found best among the uncertainty methods.

    Args:
        probabilities: ``(C, *spatial)`` class probabilities (e.g. the fold ensemble's mean softmax).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    entropy = -np.sum(p * np.log(np.maximum(p, 1e-30)), axis=0)
    if mask is not None:
        entropy = entropy[np.asarray(mask, bool)]
    return float(entropy.mean()) if entropy.size else 0.0
