"""singular_triplets against a float64 full SVD on matrices with known spectra (float32 inputs).

Shapes with min(out, in) = 576 > SMALL_GRAM take the Krylov and refined Gram paths; the 96 x 64
shape takes the float64 Gram path. Every spectrum has a clear gap at both cuts (r and k - r).
"""

import functools

import pytest
import torch

import singular_subspaces
from singular_subspaces import singular_triplets

RANK = 8
SHAPES = {"tall": (1200, 576), "wide": (576, 1200), "square": (576, 576), "small": (96, 64)}
SPECTRA = ("decaying", "flat")


def spectrum(kind: str, k: int) -> torch.Tensor:
    """Return k descending singular values with a clear gap after the first and before the last RANK."""
    index = torch.arange(1, k + 1, dtype=torch.float64)
    if kind == "decaying":
        values = index**-0.7
    else:
        values = 1.0 + 0.2 * torch.linspace(1, 0, k, dtype=torch.float64)
    values[:RANK] *= 1.3
    values[-RANK:] *= 0.7
    return values


def random_orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


@functools.cache
def matrix(shape: str, kind: str, seed: int = 0) -> torch.Tensor:
    """Return a float32 (out x in) matrix U diag(s) V^T with random orthonormal U, V."""
    out_features, in_features = SHAPES[shape]
    k = min(out_features, in_features)
    generator = torch.Generator().manual_seed(seed)
    U = random_orthonormal(out_features, k, generator)
    V = random_orthonormal(in_features, k, generator)
    return ((U * spectrum(kind, k)) @ V.T).to(torch.float32)


def largest_sine(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal-angle sine between the row spaces of A and B."""
    Qa, _ = torch.linalg.qr(A.double().T)
    Qb, _ = torch.linalg.qr(B.double().T)
    cosines = torch.linalg.svdvals(Qa.T @ Qb).clamp(max=1.0)
    return float(torch.sqrt(1 - cosines.min() ** 2))


@functools.cache
def reference(shape: str, kind: str):
    """Return (U, S, Vh) of the float64 full SVD, computed on the tall orientation (faster for wide)."""
    W = matrix(shape, kind).double()
    if W.shape[0] >= W.shape[1]:
        return torch.linalg.svd(W, full_matrices=False)
    U, S, Vh = torch.linalg.svd(W.T, full_matrices=False)
    return Vh.T, S, U.T


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: MKL's threaded SVD slows down about tenfold when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def computed(shape: str, kind: str, side: str, svd: str):
    return singular_triplets(matrix(shape, kind), RANK, side, need_u=True, svd=svd)


def selected(side: str, k: int) -> slice:
    return slice(0, RANK) if side == "top" else slice(k - RANK, k)


CASES = [(shape, kind, side, svd) for shape in SHAPES for kind in SPECTRA for side in ("top", "bottom") for svd in ("auto", "exact")]


@pytest.mark.parametrize("shape,kind,side,svd", CASES)
def test_triplets_match_float64_svd(shape, kind, side, svd):
    U, S, Vh = reference(shape, kind)
    U_r, S_r, Vh_r, info = computed(shape, kind, side, svd)
    rows = selected(side, S.shape[0])
    W = matrix(shape, kind).double()
    assert Vh_r.shape == (RANK, W.shape[1])
    assert U_r.shape == (W.shape[0], RANK)
    assert largest_sine(Vh_r, Vh[rows]) < 1e-4, info
    assert (Vh_r.double() @ Vh_r.double().T - torch.eye(RANK, dtype=torch.float64)).abs().max() < 1e-5
    assert torch.all(S_r[:-1] >= S_r[1:])
    assert (S_r.double() - S[rows]).abs().max() < 1e-5 * S[0]
    projection = W @ Vh_r.double().T @ Vh_r.double()
    rebuilt = (U_r.double() * S_r.double()) @ Vh_r.double()
    assert torch.linalg.norm(rebuilt - projection) < 1e-5 * torch.linalg.norm(W)


@pytest.mark.parametrize("shape,kind,side", [case[:3] for case in CASES if case[3] == "auto"])
def test_sine_estimate_bounds_measured_sine(shape, kind, side):
    _, S, Vh = reference(shape, kind)
    _, _, Vh_r, info = computed(shape, kind, side, "auto")
    measured = largest_sine(Vh_r, Vh[selected(side, S.shape[0])])
    assert info["sine_estimate"] <= 1e-4
    assert measured <= 2 * info["sine_estimate"] + 1e-7  # first-order estimate; 1e-7 covers float32 rounding


@pytest.mark.parametrize(
    "shape,side,path",
    [
        ("tall", "top", "block_krylov"),
        ("wide", "top", "block_krylov"),
        ("tall", "bottom", "gram_eigh_refined"),
        ("wide", "bottom", "gram_eigh_refined"),
        ("square", "bottom", "inverse_krylov"),
        ("small", "top", "gram_eigh_float64"),
        ("small", "bottom", "gram_eigh_float64"),
    ],
)
def test_auto_path_by_shape(shape, side, path):
    _, _, _, info = computed(shape, "decaying", side, "auto")
    assert info["path"] == path


@pytest.mark.parametrize("shape,side", [("tall", "top"), ("square", "bottom")])
def test_large_rank_skips_krylov(shape, side):
    rank = 64  # block 128 > n / 8 = 72
    _, S, Vh = reference(shape, "decaying")
    _, _, Vh_r, info = singular_triplets(matrix(shape, "decaying"), rank, side)
    rows = slice(0, rank) if side == "top" else slice(S.shape[0] - rank, S.shape[0])
    assert "krylov" not in info["path"]
    assert "krylov" not in " ".join(info.get("fallback_from", []))
    assert largest_sine(Vh_r, Vh[rows]) < 1e-4


@pytest.mark.parametrize("side", ["top", "bottom"])
def test_same_bytes_on_two_calls(side):
    W = matrix("square", "decaying", seed=1)
    first = singular_triplets(W, RANK, side, need_u=True)
    second = singular_triplets(W, RANK, side, need_u=True)
    for a, b in zip(first[:3], second[:3]):
        assert a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.parametrize("side", ["top", "bottom"])
def test_largest_entry_of_each_row_positive(side):
    _, _, Vh_r, _ = computed("wide", "flat", side, "auto")
    largest = torch.gather(Vh_r, 1, Vh_r.abs().argmax(dim=1, keepdim=True))
    assert torch.all(largest > 0)


@pytest.mark.parametrize("shape,side", [("tall", "top"), ("square", "bottom")])
def test_fallback_when_max_iter_tiny(shape, side):
    _, S, Vh = reference(shape, "decaying")
    _, _, Vh_r, info = singular_triplets(matrix(shape, "decaying"), RANK, side, max_iter=1)
    assert "fallback_from" in info
    assert info["path"] in ("gram_eigh_refined", "gram_eigh_float64")
    assert largest_sine(Vh_r, Vh[selected(side, S.shape[0])]) < 1e-4


@pytest.mark.parametrize("shape", ["tall", "wide", "square", "small"])
@pytest.mark.parametrize("side", ["top", "bottom"])
def test_rank_deficient_matrix_gives_finite_orthonormal_rows(shape, side):
    W = matrix(shape, "decaying").double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    S[-RANK // 2 :] = 0.0  # the bottom RANK / 2 singular values become exact zeros
    W = ((U * S) @ Vh).to(torch.float32)
    U_r, S_r, Vh_r, _ = singular_triplets(W, RANK, side, need_u=True)
    assert torch.isfinite(U_r).all()
    assert torch.isfinite(S_r).all()
    assert torch.isfinite(Vh_r).all()
    assert (Vh_r.double() @ Vh_r.double().T - torch.eye(RANK, dtype=torch.float64)).abs().max() < 1e-5
    if side == "bottom":
        null_rows = Vh_r[-RANK // 2 :].double()
        assert torch.linalg.norm(W.double() @ null_rows.T) < 1e-5 * torch.linalg.norm(W.double())


def test_need_u_false_returns_no_left_vectors():
    U_r, _, _, _ = singular_triplets(matrix("small", "decaying"), RANK, "top")
    assert U_r is None


def test_other_dtypes_return_float32():
    W = matrix("small", "decaying")
    for dtype in (torch.bfloat16, torch.float64):
        U_r, S_r, Vh_r, _ = singular_triplets(W.to(dtype), RANK, "bottom", need_u=True)
        assert U_r.dtype == S_r.dtype == Vh_r.dtype == torch.float32


@pytest.mark.parametrize(
    "arguments,message",
    [
        ({"side": "middle"}, "side must be 'top' or 'bottom'"),
        ({"svd": "lowrank"}, "Unknown svd mode 'lowrank'"),
        ({"rank": 0}, r"rank must be an integer in \[1, min\(out, in\)\]"),
        ({"rank": 65}, r"\[1, 64\]"),
        ({"tol": 0.0}, "tol must be positive"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
    ],
)
def test_invalid_arguments_raise(arguments, message):
    call = {"W": matrix("small", "decaying"), "rank": RANK, "side": "top", **arguments}
    with pytest.raises(ValueError, match=message):
        singular_triplets(**call)


def test_non_finite_weight_raises():
    W = matrix("small", "decaying").clone()
    W[3, 5] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or inf"):
        singular_triplets(W, RANK, "top")


def test_small_gram_threshold_below_test_shapes():
    assert SHAPES["square"][0] > singular_subspaces.SMALL_GRAM >= SHAPES["small"][1]
