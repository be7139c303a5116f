"""Top or bottom singular triplets of a weight matrix, computing only the part a method needs.

W (out x in) has the reduced SVD W = U S V^T with k = min(out, in) singular values, descending.
`singular_triplets` returns U_r (out x r), S_r (r,) and Vh_r = V_r^T (r x in) for the r largest
("top") or the r smallest ("bottom") of those k singular values. The work runs on W's device on
A = W if out >= in else W^T (m x n, m >= n), so the Gram matrix G = A^T A is k x k. For a wide W
the left and right vectors of A swap at the end.

`svd="auto"` takes the cheapest path whose estimate of the largest principal-angle sine between
the returned right singular subspace and the exact one is at most `tol`. Every estimate comes
from a residual measured in the last step:
- "block_krylov" (top, n > 512): block Lanczos on G in float32. It is accepted by Wedin's bound
  ||A^T U - V S||_2 / (s_r - s_{c+1}), minimized over cuts c >= r (see `_wedin_check`). When
  float32 rounding keeps that bound above tol, one Rayleigh-Ritz step over the Lanczos block in
  float64 follows ("block_krylov+float64_rayleigh_ritz").
- "gram_eigh_refined" (bottom with m >= 2n, or a top whose Lanczos is too slow): eigh of the
  float32 Gram gives a starting block and a preconditioner, and Rayleigh-Ritz steps with float64
  residuals correct the block. float32 alone loses the small singular values, because the Gram
  squares the condition number.
- "inverse_krylov" (bottom, n > 512, m < 2n): block Lanczos on G^{-1} through a float64 Cholesky
  factor. A square weight's smallest singular values lie near zero, where G^{-1} separates them.
- "gram_eigh_float64" (n <= 512, and the fallback of every path above): eigh of the float64 Gram,
  refined the same way.
- "full_svd_float64": the last resort, when the singular values at the cut are (nearly) tied.
The Gram paths estimate the sine by the first-order (Newton) corrections (G - s_i^2 I)^{-1} r_i
of the residuals r_i = G v_i - s_i^2 v_i on the complement of the current block.
`svd="exact"` runs a full float32 `torch.linalg.svd` of A instead.

Each right singular vector's sign is fixed so that its entry of largest magnitude is positive,
so the same weight gives the same bytes on the same hardware, thread count and library versions.
"""

import logging
import math

import torch

logger = logging.getLogger(__name__)

SMALL_GRAM = 512  # n at or below which the float64 Gram eigendecomposition is the cheapest exact path
MAX_BASIS_ROWS = 384  # block Lanczos restarts from its Ritz vectors beyond max(this, 3 blocks): eigh of T grows as size^3
KRYLOV_MAX_BLOCK = 8  # the Krylov paths run only if their block has at most n / 8 rows; larger ranks take the Gram paths
NEWTON_STEPS = 3  # corrections tried by the Gram and inverse paths; each costs one float64 pass over A with r rows
NEWTON_MARGIN = 2.0  # the first-order sine estimate came out up to a few percent low in tests; accept at tol / 2
FLOAT64_EPS = torch.finfo(torch.float64).eps


def fix_signs(Vh: torch.Tensor, U: torch.Tensor | None = None):
    """Flip each row of Vh (r x in) so that its entry of largest magnitude is positive.

    The matching column of U (out x r) is flipped too, so U diag(S) Vh is unchanged.
    """
    index = Vh.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(torch.gather(Vh, 1, index)).squeeze(1)
    signs[signs == 0] = 1.0
    Vh = Vh * signs[:, None]
    if U is not None:
        U = U * signs[None, :]
    return Vh, U


# ----------------------------------------------------------------------------------------------
# Building blocks. Vectors are rows: X (b x n) contains b vectors of R^n, and products with A are
# X @ A.T (b x m) and Y @ A (b x n), the faster layouts for MKL's skinny matrix products.
# ----------------------------------------------------------------------------------------------


def _block_size(rank: int, n: int) -> int:
    """Return the Lanczos and Rayleigh-Ritz block size b = r + max(r, 16), at most n."""
    return min(n, rank + max(rank, 16))


def _orthonormal_rows(X: torch.Tensor) -> torch.Tensor:
    """Return orthonormal rows spanning the row space of X (b x n, b <= n), by QR of X^T."""
    Q, _ = torch.linalg.qr(X.T)
    return Q.T


def _gram(A: torch.Tensor) -> torch.Tensor:
    """Return G = A^T A (n x n), computing only the upper block triangle (about 40% fewer flops)."""
    n = A.shape[1]
    num_blocks = max(1, round(n / 384))
    if num_blocks == 1:
        return A.T @ A
    G = torch.empty(n, n, dtype=A.dtype, device=A.device)
    edges = [i * n // num_blocks for i in range(num_blocks + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        block = A[:, start:stop].T @ A[:, start:]
        G[start:stop, start:] = block
        G[start:, start:stop] = block.T
    return G


def _gram_product(A: torch.Tensor, X: torch.Tensor):
    """Return (P, Z) = (X A^T (b x m), X A^T A (b x n)) for rows X (b x n), in X's dtype.

    On a CPU the two products run on chunks of about 2 MB of A's rows, each cast to X's dtype
    there. So each chunk is read from memory once and reused from cache, and a float64 product
    of a float32 A needs no float64 copy of A. For 8960 x 1536 and b = 32 that was 15-20% faster
    than two full passes (one thread on a shared 2-core machine).
    """
    m, n = A.shape
    if A.device.type != "cpu":
        # NOTE: untested on a GPU. On GPUs with slow float64 the inverse path's float64 Gram dominates.
        A_cast = A.to(X.dtype)
        P = X @ A_cast.T
        return P, P @ A_cast
    chunk = max(128, (2 << 20) // (X.element_size() * n))
    P = torch.empty(X.shape[0], m, dtype=X.dtype)
    Z = torch.zeros(X.shape[0], n, dtype=X.dtype)
    for start in range(0, m, chunk):
        rows = A[start : start + chunk].to(X.dtype)
        P_rows = X @ rows.T
        P[:, start : start + chunk] = P_rows
        Z.addmm_(P_rows, rows)
    return P, Z


def _spectral_norm(M: torch.Tensor) -> float:
    """Return the 2-norm (largest singular value) of a small matrix: 0 if it is empty, inf if not finite."""
    if not M.numel():
        return 0.0
    if not bool(torch.isfinite(M).all()):
        return math.inf
    return float(torch.linalg.matrix_norm(M.to(torch.float64), ord=2))


def _rayleigh_ritz(X: torch.Tensor, P: torch.Tensor, side: str, Z: torch.Tensor | None = None):
    """Return Ritz values theta (b,), vectors V (b x n), PV = V A^T (b x m), left rows Uh (b x m) and V G.

    X (b x n) has orthonormal rows, P = X A^T and Z = X G (or None; then V G is None). The SVD
    P = Y diag(sigma) Uh gives the Ritz pairs of G = A^T A, theta = sigma^2 and V = Y^T X,
    without squaring P, so Uh stays orthonormal even for tiny sigma. Ordered with the wanted end
    first: descending for "top", ascending for "bottom".
    """
    Y, sigma, Uh = torch.linalg.svd(P, full_matrices=False)  # descending
    if side == "bottom":
        Y, sigma, Uh = Y.flip(1), sigma.flip(0), Uh.flip(0)
    return sigma.square(), Y.T @ X, sigma[:, None] * Uh, Uh, (Y.T @ Z if Z is not None else None)


def _block_lanczos(apply, X0: torch.Tensor, rank: int, max_iter: int):
    """Yield (iteration, estimate, Y, K) after each block Lanczos iteration on a symmetric operator M.

    apply(X) returns X M for rows X (b x n). K (size x n) is the current orthonormal basis and
    Y (size x b) the coefficients of the b leading Ritz vectors, Y^T K. The basis is fully
    reorthogonalized (two Gram-Schmidt passes) and restarted from those Ritz vectors when it
    would exceed max(384, 3 b) rows. estimate = ||R_r||_2 / (theta_r - theta_{r+1}), where R_r
    contains the residuals of the r leading Ritz pairs taken from the Lanczos recurrence. It is
    free but blind to rounding, so callers measure their own residual before accepting. Stops
    after max_iter iterations or when the basis would exceed n rows.
    """
    block, n = X0.shape
    max_rows = max(MAX_BASIS_ROWS, 3 * block)
    basis = [_orthonormal_rows(X0)]
    T = torch.zeros(0, 0, dtype=torch.float64, device=X0.device)
    for iteration in range(1, max_iter + 1):
        Z = apply(basis[-1])
        K = torch.cat(basis)
        size = K.shape[0]

        # T = K M K^T gains the row block of the first Gram-Schmidt pass's coefficients.
        coefficients = Z @ K.T
        grown = torch.zeros(size, size, dtype=torch.float64, device=X0.device)
        grown[: size - block, : size - block] = T
        grown[size - block :, :] = coefficients.to(torch.float64)
        grown[:, size - block :] = coefficients.to(torch.float64).T
        T = grown
        Z = Z - coefficients @ K
        Z = Z - (Z @ K.T) @ K
        Q, R = torch.linalg.qr(Z.T)  # Z = R^T Q^T: the next block and its coupling to this one

        theta, Y = torch.linalg.eigh(T)
        theta, Y = theta.flip(0), Y.flip(1)
        recurrence_residual = R.to(torch.float64) @ Y[size - block :, :rank]
        gap = float(theta[rank - 1] - theta[rank]) if size > rank else 0.0
        estimate = _spectral_norm(recurrence_residual) / gap if gap > 0 else math.inf
        leading = Y[:, :block].to(K.dtype)
        yield iteration, estimate, leading, K

        if size + block > n:
            return
        if size + block > max_rows:
            basis = [_orthonormal_rows(leading.T @ K)]
            T = torch.zeros(0, 0, dtype=torch.float64, device=X0.device)
        else:
            basis.append(Q.T)


def _too_slow(history: list, target: float, remaining: int) -> bool:
    """Return whether the rate of the last two iterations predicts more than 2 * remaining to reach target."""
    if len(history) < 5 or not math.isfinite(history[-1]) or not history[-3] > 0:
        return False
    rate = math.sqrt(history[-1] / history[-3])
    if history[-1] <= target:
        return False
    return rate >= 1 or math.log(target / history[-1]) / math.log(rate) > 2 * remaining


def _relative_residual(R: torch.Tensor, A: torch.Tensor) -> float:
    """Return ||R||_2 / ||A||_F^2 for Gram residual rows R = V G - diag(S^2) V."""
    return _spectral_norm(R) / max(float(torch.linalg.vector_norm(A)) ** 2, torch.finfo(torch.float64).tiny)


# ----------------------------------------------------------------------------------------------
# Paths. Each returns (Uh (r x m), S (r,), Vh (r x n), info) in A's orientation with the wanted
# end first (bottom: ascending), or None when it gives up.
# ----------------------------------------------------------------------------------------------


def _wedin_check(A: torch.Tensor, V: torch.Tensor, PV: torch.Tensor, rank: int, tol: float):
    """Return (Uh, S, Vh, estimate, residual) for the top-r pairs if the sine estimate is at most tol, else None.

    V (b x n, b > r) are approximate top right singular vectors with orthonormal rows, and
    PV = V A^T. With S_i = ||PV_i|| and U^T = diag(1/S) PV, A V^T = U S is exact by construction,
    and E = U^T A - diag(S) V are the Wedin residuals. For every cut c in [r, b), the Wedin-type
    bound ||E_c||_2 / (S_r - S_{c+1} - ||E_{c+1}||) estimates how far the exact top-r subspace
    lies outside span(V_c), with S_{c+1} + ||E_{c+1}|| standing in for the largest singular value
    outside it; the smallest over c is the estimate. Larger cuts trade a larger residual for a
    wider gap: float32 rounding leaves residuals near eps32 * s_1 in every vector, which the
    narrow gap s_r - s_{r+1} alone would overstate.
    """
    S = PV.norm(dim=1)
    if float(S.min()) <= 0:
        return None  # rank(A) < b: the Gram path handles zero singular values
    Uh = PV / S[:, None]  # a tiny S gives a large residual below, so the estimate rejects it
    wedin = Uh @ A - S[:, None] * V
    row_norms = wedin.norm(dim=1)
    wedin_gram = (wedin @ wedin.T).to(torch.float64)
    estimate = math.inf
    for cut in range(rank, V.shape[0]):
        gap = float(S[rank - 1] - S[cut] - row_norms[cut])
        if gap > 0:
            largest = float(torch.linalg.eigvalsh(wedin_gram[:cut, :cut])[-1].clamp_min(0).sqrt())
            estimate = min(estimate, largest / gap)
    if estimate > tol:
        return None
    return Uh[:rank], S[:rank], V[:rank], estimate, _relative_residual(S[:rank, None] * wedin[:rank], A)


def _top_block_krylov(A: torch.Tensor, rank: int, tol: float, max_iter: int, generator: torch.Generator):
    """Return the top-r triplets of A (m x n) by float32 block Lanczos on G = A^T A, or None.

    The start block is Omega^T A for a Gaussian Omega (m x b), already tilted towards the top.
    Once the recurrence estimate is tol / 3, each iteration checks the Wedin estimate of
    `_wedin_check` in float32 on the b leading Ritz vectors, reusing the stored products
    K A^T. Once it is tol / 100, more float32 iterations cannot lower the measured residual,
    and a Rayleigh-Ritz step over those vectors in float64 decides. None: tol not reached, or
    the convergence rate predicts more than max_iter iterations.
    """
    m, n = A.shape
    block = _block_size(rank, n)
    sketch = torch.randn(block, m, generator=generator, dtype=torch.float32).to(A.device)
    products = []  # X A^T of every applied block, so the last K.shape[0] rows match the current basis

    def apply(X):
        P, Z = _gram_product(A, X)
        products.append(P)
        return Z

    history = []
    leading_rows = None
    for iteration, estimate, Y, K in _block_lanczos(apply, sketch @ A, rank, max_iter):
        history.append(estimate)
        if estimate <= tol / 3:
            P = torch.cat(products)[-K.shape[0] :]
            checked = _wedin_check(A, Y.T @ K, Y.T @ P, rank, tol)
            if checked is not None:
                Uh, S, Vh, sine, residual = checked
                return Uh, S, Vh, {"path": "block_krylov", "sine_estimate": sine, "residual": residual, "iterations": iteration}
            if estimate <= tol / 100:
                leading_rows = Y.T @ K
                break
        elif _too_slow(history, tol / 3, max_iter - iteration):
            return None
        del products[: len(products) - K.shape[0] // block]
    if leading_rows is None:
        return None

    A64 = A.to(torch.float64)
    X = _orthonormal_rows(leading_rows.to(torch.float64))
    _, V, PV, _, _ = _rayleigh_ritz(X, X @ A64.T, "top")
    checked = _wedin_check(A64, V, PV, rank, tol)
    if checked is None:
        return None
    Uh, S, Vh, sine, residual = checked
    info = {"path": "block_krylov+float64_rayleigh_ritz", "sine_estimate": sine, "residual": residual, "iterations": iteration}
    return Uh, S, Vh, info


def _newton_refine(A, X, rank, side, tol, correct, left, certify=None, residual_rows=None):
    """Refine the r wanted Ritz pairs of G = A^T A, starting from span(X), until the sine estimate is tol / 2.

    X (b x n, float64) has orthonormal rows, and every product with A runs in float64. `correct(R, theta)`
    maps the residual rows R = V_r G - diag(theta_r) V_r (r x n) and the block's Ritz values theta
    (wanted end first) to first-order (Newton) corrections C_i ~ (G - theta_i I)^{-1} r_i on the
    complement of the block, minus the error of v_i there. The sine estimate for V is ||C||_2
    times sqrt(1 + (gamma / delta)^2), where gamma is the residual norm of the block's other Ritz
    vectors and delta = |theta_{r+1} - theta_r| (their coupling can rotate the wanted vectors
    inside the block), or certify(V, theta, R_all) when given. With `left`, the estimate also
    covers U = A V^T / S, whose error C A^T / S grows with s_1 / s_i. Each step appends the
    orthonormalized C to the block for the next Rayleigh-Ritz, and stops once the estimate stops
    shrinking tenfold per step. Returns (Uh, S, Vh, estimate, residual rows R, steps).
    """
    block = X.shape[0]
    rows = residual_rows or block
    P, Z = _gram_product(A, X)
    estimate = math.inf
    for step in range(NEWTON_STEPS + 1):
        theta, V, PV, Uh_block, GV = _rayleigh_ritz(X, P, side, Z)
        R_all = GV[:rows] - theta[:rows, None] * V[:rows]
        R = R_all[:rank]
        C = correct(R, theta)
        C = C - (C @ V.T) @ V
        norm_c = _spectral_norm(C)
        if certify is not None:
            sine_v = certify(V, theta, R_all)
        else:
            gamma = _spectral_norm(R_all[rank:])
            delta = abs(float(theta[rank] - theta[rank - 1])) if theta.shape[0] > rank else math.inf
            coupling = 1.0
            if gamma > 0:
                coupling = math.sqrt(1 + (gamma / delta) ** 2) if delta > 0 else math.inf
            sine_v = norm_c * coupling if norm_c > 0 else 0.0

        S, Uh = theta[:rank].sqrt(), Uh_block[:rank]
        C_rows = P_C = Z_C = None
        if norm_c > 0:
            C_rows = _orthonormal_rows(C)
        sine_u = 0.0
        if left and float(S.min()) == 0:
            sine_u = math.inf
        elif left and C_rows is not None:
            P_C, Z_C = _gram_product(A, C_rows)
            error_u = ((C @ C_rows.T) @ P_C) / S[:, None]  # C A^T, since C lies in span(C_rows)
            scale = sine_v / max(norm_c, torch.finfo(torch.float64).tiny)
            sine_u = _spectral_norm(error_u - (error_u @ Uh.T) @ Uh) * scale

        previous, estimate = estimate, max(sine_v, sine_u)
        if estimate * NEWTON_MARGIN <= tol or step == NEWTON_STEPS or estimate > previous / 10 or C_rows is None:
            break
        if P_C is None:
            P_C, Z_C = _gram_product(A, C_rows)
        X = torch.cat([V[:block], C_rows])
        P = torch.cat([PV[:block], P_C])
        Z = torch.cat([GV[:block], Z_C])
    return Uh, S, V[:rank], estimate, R, step


def _gram_eigh_refined(A: torch.Tensor, rank: int, side: str, tol: float, gram_dtype: torch.dtype, left: bool):
    """Return the wanted triplets from eigh of G = A^T A in `gram_dtype`, refined with float64 residuals.

    G = Z diag(lambda) Z^T gives the starting block (the r + 8 eigenvectors at the wanted end)
    and the correction C_i = Z_out diag(1 / (lambda_out - theta_i)) Z_out^T r_i over the other
    eigenvectors. In float32 the eigenvalues carry errors near eps32 * lambda_max, so on a badly
    conditioned A the bottom corrections stop shrinking and the caller falls back to float64.
    """
    n = A.shape[1]
    block = min(n, rank + 8)
    eigenvalues, Z = torch.linalg.eigh(_gram(A.to(gram_dtype)))  # ascending
    if side == "top":
        eigenvalues, Z = eigenvalues.flip(0), Z.flip(1)
    Z_out, lambda_out = Z[:, block:], eigenvalues[block:].to(torch.float64)
    floor = max(torch.finfo(gram_dtype).eps * float(eigenvalues.abs().max()), torch.finfo(torch.float64).tiny)

    def correct(R, theta):
        denominator = lambda_out[None, :] - theta[:rank, None]
        sign = torch.where(denominator < 0, -1.0, 1.0).to(torch.float64)
        denominator = torch.where(denominator.abs() < floor, sign * floor, denominator)
        coefficients = (R.to(Z.dtype) @ Z_out).to(torch.float64) / denominator
        return (coefficients.to(Z.dtype) @ Z_out.T).to(torch.float64)

    X = _orthonormal_rows(Z[:, :block].T.to(torch.float64))
    Uh, S, Vh, estimate, R, steps = _newton_refine(A, X, rank, side, tol, correct, left)
    path = "gram_eigh_refined" if gram_dtype == torch.float32 else "gram_eigh_float64"
    return Uh, S, Vh, {"path": path, "sine_estimate": estimate, "residual": _relative_residual(R, A), "iterations": steps}


def _bottom_inverse_krylov(A: torch.Tensor, rank: int, tol: float, max_iter: int, generator: torch.Generator, left: bool):
    """Return the bottom-r triplets by block Lanczos on H = (G + delta I)^{-1} in float64, or None.

    G = A^T A is factored by Cholesky after the shift delta = 10 n eps64 max(diag G), which keeps
    a singular G factorable without changing its eigenvectors. The largest eigenvalues of H are
    the smallest of G, well separated when they lie near zero, as for square weights. The sine
    estimate is the Davis-Kahan bound for H, ||V_r H - M V_r||_2 / (mu_min(M) - mu_{r+1} - rho_{r+1}),
    with M = V_r H V_r^T and (mu_{r+1}, rho_{r+1}) the Rayleigh quotient and residual norm under H
    of the next Ritz vector, which bound H's largest eigenvalue outside the wanted set; the correction
    C_i = H r_i / (1 - theta_r / theta_b) (theta_b: the block's largest Ritz value) bounds the
    Newton correction on eigenvalues of G above the block. None: tol not reached within max_iter.
    """
    n = A.shape[1]
    block = _block_size(rank, n)
    A64 = A.to(torch.float64)
    G = _gram(A64)
    delta = max(10 * n * FLOAT64_EPS * float(torch.diagonal(G).max()), torch.finfo(torch.float64).tiny)
    G.diagonal().add_(delta)
    L, failed = torch.linalg.cholesky_ex(G)
    del G
    if int(failed):
        return None

    def apply_inverse(X):
        Y = torch.linalg.solve_triangular(L, X.T, upper=False)
        return torch.linalg.solve_triangular(L.T, Y, upper=True).T

    start = torch.randn(block, n, generator=generator, dtype=torch.float64).to(A.device)
    history = []
    ritz_rows = None
    for iteration, estimate, Y, K in _block_lanczos(apply_inverse, start, rank, max_iter):
        history.append(estimate)
        if estimate <= tol / 10:
            ritz_rows = Y.T @ K
            break
        if _too_slow(history, tol / 10, max_iter - iteration):
            return None
    if ritz_rows is None:
        return None

    def correct(R, theta):
        shrink = 1 - float(theta[rank - 1]) / max(float(theta[block - 1]), torch.finfo(torch.float64).tiny)
        return apply_inverse(R) / max(shrink, 1e-3)

    def certify(V, theta, R_all):
        HV = apply_inverse(V[: rank + 1])
        M = HV[:rank] @ V[:rank].T
        next_value = float(HV[rank] @ V[rank])
        next_bound = next_value + float((HV[rank] - next_value * V[rank]).norm())
        gap = float(torch.linalg.eigvalsh((M + M.T) / 2)[0]) - next_bound
        return _spectral_norm(HV[:rank] - M @ V[:rank]) / gap if gap > 0 else math.inf

    X = _orthonormal_rows(ritz_rows)
    Uh, S, Vh, estimate, R, steps = _newton_refine(A64, X, rank, "bottom", tol, correct, left, certify, rank)
    if estimate * NEWTON_MARGIN > tol:
        return None
    info = {"path": "inverse_krylov", "sine_estimate": estimate, "residual": _relative_residual(R, A64), "iterations": iteration + steps}
    return Uh, S, Vh, info


def _full_svd(A: torch.Tensor, rank: int, side: str, dtype: torch.dtype):
    """Return the wanted triplets, wanted end first, from a full `torch.linalg.svd` of A in `dtype`."""
    U, S, Vh = torch.linalg.svd(A.to(dtype), full_matrices=False)
    k = S.shape[0]
    selected = torch.arange(rank) if side == "top" else torch.arange(k - 1, k - 1 - rank, -1)
    selected = selected.to(S.device)
    info = {"path": f"full_svd_{str(dtype).removeprefix('torch.')}", "sine_estimate": None, "residual": None, "iterations": None}
    return U[:, selected].T, S[selected], Vh[selected], info


def _accepted(result, tol: float):
    """Return a Newton-estimated result if its estimate times NEWTON_MARGIN is at most tol, else None."""
    return result if result[3]["sine_estimate"] * NEWTON_MARGIN <= tol else None


def _auto_triplets(A: torch.Tensor, rank: int, side: str, tol: float, max_iter: int, generator: torch.Generator, left: bool):
    """Return (Uh, S, Vh, info) from the cheapest path for A's shape and `side` that reaches tol.

    `left`: A's left vectors are returned (as U, or as W's right vectors when W is wide), so their
    sine estimate must reach tol too.
    """
    m, n = A.shape
    large = n > SMALL_GRAM
    krylov = large and _block_size(rank, n) * KRYLOV_MAX_BLOCK <= n
    candidates = []
    if krylov and side == "top":
        candidates.append(("block_krylov", lambda: _top_block_krylov(A, rank, tol, max_iter, generator)))
    if large and (side == "top" or m >= 2 * n):
        candidates.append(("gram_eigh_refined", lambda: _accepted(_gram_eigh_refined(A, rank, side, tol, torch.float32, left), tol)))
    if krylov and side == "bottom":
        candidates.append(("inverse_krylov", lambda: _bottom_inverse_krylov(A, rank, tol, max_iter, generator, left)))
    candidates.append(("gram_eigh_float64", lambda: _accepted(_gram_eigh_refined(A, rank, side, tol, torch.float64, left), tol)))

    tried = []
    for name, candidate in candidates:
        result = candidate()
        if result is not None:
            if tried:
                result[3]["fallback_from"] = tried
            return result
        tried.append(name)

    # NOTE: reached when the singular values at the cut (s_r and s_{r+1} counted from the wanted
    # end) are (nearly) equal, so the subspace is not unique to within tol, or when `left` and a
    # selected singular value is (nearly) zero, so U = A V / S is undefined.
    logger.warning("No cheap path certified the %s-%d singular subspace of a %d x %d matrix to %.1e; running a float64 SVD.", side, rank, m, n, tol)
    Uh, S, Vh, info = _full_svd(A, rank, side, torch.float64)
    info["fallback_from"] = tried
    return Uh, S, Vh, info


def _check_arguments(W, rank, side, svd, tol, max_iter):
    """Raise ValueError naming the invalid argument and what is accepted."""
    if side not in ("top", "bottom"):
        raise ValueError(f"side must be 'top' or 'bottom', got {side!r}.")
    if svd not in ("auto", "exact"):
        raise ValueError(f"Unknown svd mode {svd!r}: use 'auto' or 'exact'.")
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a 2-D floating-point tensor, got {type(W).__name__} of shape {tuple(getattr(W, 'shape', ()))}.")
    k = min(W.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ValueError(f"rank must be an integer in [1, min(out, in)] = [1, {k}] for W of shape {tuple(W.shape)}, got {rank!r}.")
    if not tol > 0:
        raise ValueError(f"tol must be positive (a bound on the principal-angle sine, e.g. 1e-4), got {tol!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    smallest, largest = torch.aminmax(W.detach())
    if not (torch.isfinite(smallest) and torch.isfinite(largest)):
        raise ValueError(f"W of shape {tuple(W.shape)} contains NaN or inf, so its singular vectors are undefined.")


def singular_triplets(
    W: torch.Tensor,
    rank: int,
    side: str,
    need_u: bool = False,
    svd: str = "auto",
    tol: float = 1e-4,
    max_iter: int = 30,
    generator: torch.Generator | None = None,
):
    """Return (U_r, S_r, Vh_r, info) for the top or bottom r singular triplets of W (out x in).

    U_r: (out x r), or None unless need_u; S_r: (r,) descending; Vh_r: (r x in) with orthonormal
    rows; all float32 on W's device. "bottom" means the r smallest of the reduced SVD's
    min(out, in) singular values. With svd="auto", `tol` bounds the estimated largest
    principal-angle sine between the returned right singular subspace and the exact one (and
    between the left ones when need_u). The Krylov estimates overstate the sine, and the Gram
    paths' first-order estimates are accepted at tol / 2. At tol = 1e-4 the benchmark weights of
    docs/benchmarks.md came out with sines near 2e-6. `max_iter` caps the Lanczos iterations of
    a Krylov path before it falls back, and `generator` (a CPU generator) seeds their random
    start block (default: seed 0). info: "path", "sine_estimate", "residual"
    (||A^T A V_r - V_r S_r^2||_2 / ||W||_F^2), "iterations", and "fallback_from" (the paths that
    missed tol) after a fallback. The exact path leaves the numbers None.
    """
    _check_arguments(W, rank, side, svd, tol, max_iter)
    transposed = W.shape[0] < W.shape[1]
    W32 = W.detach().to(torch.float32)
    A = W32.T if transposed else W32

    if svd == "exact":
        Uh, S, Vh, info = _full_svd(A, rank, side, torch.float32)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        Uh, S, Vh, info = _auto_triplets(A, rank, side, tol, max_iter, generator, left=transposed or need_u)

    if side == "bottom":  # the paths return the wanted end first; S_r is descending
        Uh, S, Vh = Uh.flip(0), S.flip(0), Vh.flip(0)
    U_r, Vh_r = (Vh.T, Uh) if transposed else (Uh.T, Vh)
    Vh_r, U_r = fix_signs(Vh_r.to(torch.float64), U_r.to(torch.float64))
    return (
        U_r.to(torch.float32) if need_u else None,
        S.to(torch.float32),
        Vh_r.to(torch.float32),
        info,
    )
