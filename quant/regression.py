"""Least-squares pieces of QwT (SPEC §3): ``[X, 1] @ [[W], [b]] ≈ Y`` and its r² score.

Two ways to the same fit: the published one (concatenate every token, float32 inverse of
[X,1]^T[X,1], times [X,1]^T, times Y) and normal equations accumulated batch by batch, which never
holds all tokens at once and all-reduces two small matrices across processes.
"""
import torch

SOLVERS = ('inverse', 'lstsq')
# Features are float32: directions of [X, 1] with singular values below ~1e-6 of the largest are
# rounding noise (e.g. a LayerNorm output is collinear with the ones column). The float64 solver
# drops them instead of fitting them with huge weights that the fp16 inference form cannot hold.
LSTSQ_RCOND_X = 1e-6
# The float32 inverse of [X,1]^T[X,1] keeps no accurate digit once the matrix's condition number reaches
# 1 / float32's epsilon (2^23): its solution can then fit far worse than none at all (r² far below 0).
SINGULAR_CONDITION = 2.0 ** 23


class NonFiniteSystem(ValueError):
    """inf or NaN in the system to solve: [X,1]^T[X,1] for the inverse, [X,1] or Y (or the normal
    equations) for the least-squares driver, which would otherwise abort inside LAPACK."""


def _require_finite(*tensors):
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteSystem('inf or NaN in the least-squares system')


def with_ones(x):
    """[tokens, C] -> [tokens, C + 1] with a trailing column of ones (the bias term)."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=-1)


def split_wb(w1):
    """[[W], [b]] -> (W [C_in, C_out], b [C_out])."""
    return w1[:-1, :].contiguous(), w1[-1, :].contiguous()


def fit_concat(x, y, solver='inverse'):
    """The published fit on all tokens at once: x [tokens, C_in], y [tokens, C_out] -> (W, b).

    Raises ``torch.linalg.LinAlgError`` where the inverse finds [X,1]^T[X,1] singular and
    ``NonFiniteSystem`` where that matrix ('inverse') or x, y ('lstsq') hold inf or NaN.
    """
    x1 = with_ones(x)
    if solver == 'inverse':
        x1_t = x1.t()
        gram = x1_t @ x1
        _require_finite(gram)
        return split_wb(torch.inverse(gram) @ x1_t @ y)
    if solver == 'lstsq':
        return _lstsq(x1.double(), y.double(), y.dtype, LSTSQ_RCOND_X)
    raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")


def rank_and_condition(gram):
    """(numerical rank, condition number) of a symmetric positive semi-definite matrix such as
    [X,1]^T[X,1], from its float64 eigenvalues: the rank counts the directions the float64 least-squares
    solver keeps (eigenvalues above LSTSQ_RCOND_X^2 times the largest: singular values of [X,1] above
    LSTSQ_RCOND_X times the largest); the condition number is largest / smallest (inf when the smallest is
    not positive)."""
    ev = torch.linalg.eigvalsh(gram.double())
    top, low = float(ev[-1]), float(ev[0])
    rank = int((ev > LSTSQ_RCOND_X ** 2 * top).sum())
    return rank, (top / low if low > 0 else float('inf'))


def solve_normal(gram, rhs, solver='inverse', dtype=torch.float32):
    """(W, b) from accumulated normal equations gram = [X,1]^T[X,1], rhs = [X,1]^T Y.

    'inverse' is the published float32 inverse; 'lstsq' solves in float64 with a rank-revealing
    least-squares driver, which stays accurate when features are nearly collinear. Raises like
    ``fit_concat``: ``NonFiniteSystem`` for inf or NaN in gram ('inverse') or in gram or rhs ('lstsq').
    """
    if solver == 'inverse':
        gram = gram.to(dtype)
        _require_finite(gram)
        return split_wb(torch.inverse(gram) @ rhs.to(dtype))
    if solver == 'lstsq':
        return _lstsq(gram.double(), rhs.double(), dtype, LSTSQ_RCOND_X ** 2)
    raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")


def _lstsq(a, b, dtype, rcond):
    device = a.device
    _require_finite(a, b)  # gelsd fails with an internal assert, not an error, on inf or NaN
    # gelsd (SVD based, handles rank deficiency) exists only on the CPU; the systems are small.
    sol = torch.linalg.lstsq(a.cpu(), b.cpu(), rcond=rcond, driver='gelsd').solution
    return split_wb(sol.to(device=device, dtype=dtype))


def r2_score(y, y_pred):
    """1 - SS_res / SS_tot over all tokens, SS_tot around the per-column mean of y."""
    ss_tot = torch.sum((y - y.mean(dim=0)).pow(2))
    ss_res = torch.sum((y - y_pred).pow(2))
    return 1 - ss_res / ss_tot


class NormalEquations:
    """Running [X,1]^T[X,1], [X,1]^T Y and token count, filled batch by batch on the device."""

    def __init__(self, c_in, c_out, device, dtype=torch.float32):
        self.gram = torch.zeros(c_in + 1, c_in + 1, device=device, dtype=dtype)
        self.rhs = torch.zeros(c_in + 1, c_out, device=device, dtype=dtype)
        self.dtype = dtype

    def add(self, x, y):
        x1 = with_ones(x.to(self.dtype))
        x1_t = x1.t()
        self.gram.addmm_(x1_t, x1)
        self.rhs.addmm_(x1_t, y.to(self.dtype))

    @property
    def count(self):
        return self.gram[-1, -1]

    @property
    def y_sum(self):
        return self.rhs[-1]  # the ones column times Y
