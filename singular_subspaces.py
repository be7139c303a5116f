"""Top and bottom singular triplets of a weight matrix, computing only the part a method needs.

For W (out x in) with reduced SVD W = U S V^T (singular values descending), `singular_triplets`
returns U_r, S_r and the rows V_r^T for the r largest ("top") or the r smallest ("bottom") of
the min(out, in) singular values:
- top, `svd="auto"`: subspace iteration on W^T W with a Rayleigh-Ritz step, stopped when the
  relative residual max_i ||W^T W v_i - s_i^2 v_i|| / s_1^2 falls below `tol`; if it has not
  converged after `max_iter` iterations, the Gram path below is used instead.
- bottom, `svd="auto"`: eigendecomposition of the smaller Gram matrix (W^T W or W W^T) in
  float64, because float32 loses the small singular values (the Gram squares the condition number).
- `svd="exact"`: a full `torch.linalg.svd` in float32.
Each right singular vector's sign is fixed so that its entry of largest magnitude is positive,
so the same weight always gives the same bytes.
"""

import torch



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


def _gram_triplets(W: torch.Tensor, rank: int, side: str, need_u: bool):
    """Return (U_r, S_r, Vh_r) from the eigendecomposition of the smaller Gram matrix, in float64.

    W: (out x in). If in <= out, W^T W = V S^2 V^T gives V directly and U_r = W V_r / S_r;
    otherwise W W^T = U S^2 U^T gives U and Vh_r = (W^T U_r / S_r)^T, re-orthonormalized by QR.
    """
    W64 = W.to(torch.float64)
    out_features, in_features = W64.shape
    k = min(out_features, in_features)
    positions = torch.arange(k - rank, k) if side == "top" else torch.arange(0, rank)

    if in_features <= out_features:
        eigenvalues, eigenvectors = torch.linalg.eigh(W64.T @ W64)  # ascending
        V_r = eigenvectors[:, positions].flip(1)  # descending singular values
        S_r = eigenvalues[positions].flip(0).clamp_min(0).sqrt()
        U_r = None
        if need_u:
            U_r = (W64 @ V_r) / S_r.clamp_min(torch.finfo(torch.float64).tiny)
            U_r[:, S_r == 0] = 0.0  # NOTE: a zero singular value has no defined left vector
        return U_r, S_r, V_r.T

    eigenvalues, eigenvectors = torch.linalg.eigh(W64 @ W64.T)
    U_r = eigenvectors[:, positions].flip(1)
    S_r = eigenvalues[positions].flip(0).clamp_min(0).sqrt()
    V_r = (W64.T @ U_r) / S_r.clamp_min(torch.finfo(torch.float64).tiny)
    Q, R = torch.linalg.qr(V_r)
    V_r = Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)  # keep each column's direction
    return (U_r if need_u else None), S_r, V_r.T


def _top_subspace_iteration(W: torch.Tensor, rank: int, tol: float, max_iter: int, generator: torch.Generator):
    """Return (U_r, S_r, Vh_r, residual, iterations) for the top-r triplets by subspace iteration.

    Q (in x (r + p)) is multiplied by W^T W and re-orthonormalized each iteration; every second
    iteration a Rayleigh-Ritz step gives Ritz triplets and the residual
    max_i ||W^T W v_i - sigma_i^2 v_i|| / sigma_1^2 over the top r. Returns residual = inf if it
    stays above `tol` after `max_iter` iterations.
    """
    W32 = W.to(torch.float32)
    in_features = W32.shape[1]
    block = min(in_features, 2 * rank + 8)
    Q = torch.randn(in_features, block, generator=generator, dtype=torch.float32).to(W32.device)
    Q, _ = torch.linalg.qr(Q)
    residual = float("inf")
    iteration = 0
    U_r = S_r = Vh_r = None
    while iteration < max_iter:
        Q, _ = torch.linalg.qr(W32.T @ (W32 @ Q))
        iteration += 1
        if iteration % 2:
            continue
        # Rayleigh-Ritz: W Q = Ub Sb Vbh gives Ritz right vectors Q Vbh^T.
        Ub, Sb, Vbh = torch.linalg.svd(W32 @ Q, full_matrices=False)
        V_r = Q @ Vbh[:rank].T
        S_r = Sb[:rank]
        WV = W32 @ V_r
        R = W32.T @ WV - V_r * S_r.square()
        residual = (R.norm(dim=0).max() / S_r[0].square().clamp_min(1e-30)).item()
        if residual < tol:
            U_r = Ub[:, :rank]
            Vh_r = V_r.T
            return U_r, S_r, Vh_r, residual, iteration
    return None, None, None, float("inf"), iteration


def singular_triplets(
    W: torch.Tensor,
    rank: int,
    side: str,
    need_u: bool = False,
    svd: str = "auto",
    tol: float = 1e-6,
    max_iter: int = 60,
    generator: torch.Generator | None = None,
):
    """Return (U_r, S_r, Vh_r, info) for the top or bottom r singular triplets of W (out x in).

    U_r: (out x r) or None unless need_u, S_r: (r,) descending, Vh_r: (r x in) with orthonormal
    rows, all float32 on W's device. "bottom" means the r smallest of the reduced SVD's
    min(out, in) singular values. info: {"path": ..., "residual": ...}.
    """
    if side not in ("top", "bottom"):
        raise ValueError(f"side must be 'top' or 'bottom', got {side!r}")
    info = {"path": None, "residual": None}
    U_r = None

    if svd == "exact":
        U, S, Vh = torch.linalg.svd(W.to(torch.float32), full_matrices=False)
        selected = slice(0, rank) if side == "top" else slice(S.shape[0] - rank, S.shape[0])
        U_r, S_r, Vh_r = U[:, selected], S[selected], Vh[selected]
        info["path"] = "full_svd_float32"
    elif svd == "auto":
        if side == "top":
            if generator is None:
                generator = torch.Generator().manual_seed(0)
            U_r, S_r, Vh_r, residual, iterations = _top_subspace_iteration(W, rank, tol, max_iter, generator)
            if Vh_r is not None:
                info.update(path=f"subspace_iteration_{iterations}", residual=residual)
        if info["path"] is None:
            U_r, S_r, Vh_r = _gram_triplets(W, rank, side, need_u)
            info["path"] = "gram_eigh_float64"
    else:
        raise ValueError(f"Unknown svd mode {svd!r}: use 'auto' or 'exact'.")

    Vh_r, U_r = fix_signs(Vh_r.to(torch.float64), U_r.to(torch.float64) if U_r is not None else None)
    return (
        U_r.to(torch.float32) if (need_u and U_r is not None) else None,
        S_r.to(torch.float32),
        Vh_r.to(torch.float32),
        info,
    )
