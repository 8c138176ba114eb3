"""QwT least squares (quant/regression.py): planted linear maps, streamed normal equations, r²."""
import pytest
import torch

from quant.regression import (SOLVERS, NonFiniteSystem, NormalEquations, fit_concat, r2_score, solve_normal,
                              with_ones)

SOLVER_NAMES = ('inverse', 'lstsq')


def _planted(n=3000, c_in=16, c_out=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, generator=g) * 0.7 + 0.2  # well conditioned, not centred
    w = torch.randn(c_in, c_out, generator=g)
    b = torch.randn(c_out, generator=g) * 2.0
    return x, x @ w + b, w, b


def _rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max())


def test_solver_names_select_their_solver_hand_values():
    """x = [0, 1, 2], y = 2x + 1: both solvers give W = 2, b = 1. x = [1, 1, 1] (collinear with the
    bias column), y = 2: [X,1]^T[X,1] = [[3, 3], [3, 3]] is singular: 'inverse' (the published float32
    inverse) raises, 'lstsq' returns the minimum-norm solution W = b = 1."""
    assert SOLVERS == ('inverse', 'lstsq')
    x, y = torch.tensor([[0.], [1.], [2.]]), torch.tensor([[1.], [3.], [5.]])
    for solver in SOLVER_NAMES:
        w, b = fit_concat(x, y, solver)
        assert w.tolist() == [[pytest.approx(2.0, abs=1e-5)]] and b.tolist() == [pytest.approx(1.0, abs=1e-5)]
    ones, twos = torch.ones(3, 1), torch.full((3, 1), 2.0)
    with pytest.raises(torch.linalg.LinAlgError):
        fit_concat(ones, twos, 'inverse')
    with pytest.raises(torch.linalg.LinAlgError):
        solve_normal(torch.tensor([[3., 3.], [3., 3.]]), torch.tensor([[6.], [6.]]), 'inverse')
    w, b = fit_concat(ones, twos, 'lstsq')
    assert (w.item(), b.item()) == (pytest.approx(1.0, abs=1e-6), pytest.approx(1.0, abs=1e-6))
    w, b = solve_normal(torch.tensor([[3., 3.], [3., 3.]], dtype=torch.float64),
                        torch.tensor([[6.], [6.]], dtype=torch.float64), 'lstsq')
    assert (w.item(), b.item()) == (pytest.approx(1.0, abs=1e-6), pytest.approx(1.0, abs=1e-6))


def _near_collinear(ratio, n=2000):
    """Features whose smallest singular value (with the bias column) is about ``ratio`` of the
    largest, and a target that lies along that direction only."""
    g = torch.Generator().manual_seed(0)
    a, e = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
    eps = 2 * ratio
    x = torch.cat([a, a + eps * e, torch.randn(n, 1, generator=g, dtype=torch.float64)], 1).float()
    s = torch.linalg.svdvals(with_ones(x.double()))
    assert float(s[-1] / s[0]) == pytest.approx(ratio, rel=0.05)
    return x, ((x.double()[:, 1:2] - x.double()[:, :1]) / eps).float()


@pytest.mark.parametrize('ratio,kept', [(3e-6, True), (3e-7, False)])
def test_lstsq_keeps_directions_above_one_millionth(ratio, kept):
    """The float64 solver's cut-off is 1e-6 of the largest singular value of [X, 1] (1e-12 of the
    largest eigenvalue of the normal equations): a direction at 3e-6 is fitted (r² ≈ 1), one at
    3e-7 is dropped (r² ≈ 0), on both paths."""
    from quant.regression import LSTSQ_RCOND_X
    assert LSTSQ_RCOND_X == 1e-6
    x, y = _near_collinear(ratio)
    neq = NormalEquations(3, 1, torch.device('cpu'), torch.float64)
    neq.add(x, y)
    for w, b in (fit_concat(x, y, 'lstsq'), solve_normal(neq.gram, neq.rhs, 'lstsq')):
        r2 = float(r2_score(y, x @ w + b))
        assert (r2 > 0.99) if kept else (r2 < 0.01), r2


@pytest.mark.parametrize('solver', SOLVER_NAMES)
def test_fit_concat_recovers_planted_map(solver):
    x, y, w, b = _planted()
    w_hat, b_hat = fit_concat(x, y, solver)
    assert w_hat.shape == (16, 8) and b_hat.shape == (8,)
    assert w_hat.dtype == torch.float32 and b_hat.dtype == torch.float32
    assert _rel_err(w_hat, w) < 1e-4
    assert _rel_err(b_hat, b) < 1e-4


@pytest.mark.parametrize('solver', SOLVER_NAMES)
def test_streamed_normal_equations_recover_planted_map(solver):
    x, y, w, b = _planted(seed=1)
    neq = NormalEquations(16, 8, torch.device('cpu'))
    for xs, ys in zip(x.split(700), y.split(700)):  # 5 batches, the last one smaller
        neq.add(xs, ys)
    w_hat, b_hat = solve_normal(neq.gram, neq.rhs, solver)
    assert w_hat.shape == (16, 8) and b_hat.shape == (8,)
    assert w_hat.dtype == torch.float32
    assert _rel_err(w_hat, w) < 1e-4
    assert _rel_err(b_hat, b) < 1e-4


def test_streamed_gram_and_rhs_equal_one_shot():
    x, y, _, _ = _planted(n=1000, c_in=12, c_out=5, seed=2)
    neq = NormalEquations(12, 5, torch.device('cpu'))
    sizes = [1, 99, 400, 500]
    for xs, ys in zip(x.split(sizes), y.split(sizes)):
        neq.add(xs, ys)
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    gram = x1.t() @ x1
    rhs = x1.t() @ y.double()
    assert neq.gram.shape == (13, 13) and neq.rhs.shape == (13, 5)
    torch.testing.assert_close(neq.gram.double(), gram, rtol=1e-5, atol=1e-5 * float(gram.abs().max()))
    torch.testing.assert_close(neq.rhs.double(), rhs, rtol=1e-5, atol=1e-5 * float(rhs.abs().max()))
    assert float(neq.count) == 1000.0
    torch.testing.assert_close(neq.y_sum.double(), y.double().sum(0), rtol=1e-5, atol=1e-3)


def test_with_ones_appends_bias_column():
    x = torch.arange(6.).reshape(3, 2)
    assert torch.equal(with_ones(x), torch.tensor([[0., 1., 1.], [2., 3., 1.], [4., 5., 1.]]))


def test_lstsq_handles_exactly_collinear_features():
    """A duplicated feature column: the rank-deficient system still predicts Y exactly."""
    x, y, _, _ = _planted(n=500, c_in=6, c_out=3, seed=3)
    x = torch.cat([x, x[:, :1]], dim=1)
    neq = NormalEquations(7, 3, torch.device('cpu'))
    neq.add(x, y)
    w_hat, b_hat = solve_normal(neq.gram, neq.rhs, 'lstsq')
    assert torch.isfinite(w_hat).all()
    assert _rel_err(x @ w_hat + b_hat, y) < 1e-4


def test_r2_score_hand_values():
    y = torch.tensor([[1.], [2.], [3.]])
    assert float(r2_score(y, y.clone())) == 1.0
    assert float(r2_score(y, torch.full_like(y, 2.0))) == 0.0        # the mean: SS_res = SS_tot
    assert float(r2_score(y, torch.tensor([[3.], [2.], [1.]]))) == pytest.approx(-3.0)  # 8 / 2
    assert float(r2_score(y, torch.tensor([[1.], [2.], [4.]]))) == pytest.approx(0.5)   # 1 / 2


def test_r2_score_uses_per_column_mean():
    y = torch.tensor([[0., 10.], [2., 12.]])  # column means 1, 11: SS_tot = 4 (36 around the global mean)
    assert float(r2_score(y, torch.tensor([[1., 11.], [1., 11.]]))) == pytest.approx(0.0, abs=1e-7)
    assert float(r2_score(y, torch.tensor([[0., 10.], [2., 13.]]))) == pytest.approx(0.75)


@pytest.mark.parametrize('call', ['fit_concat', 'solve_normal'])
def test_unknown_solver_raises(call):
    x, y, _, _ = _planted(n=50, c_in=3, c_out=2)
    with pytest.raises(ValueError, match="'cholesky'") as info:
        if call == 'fit_concat':
            fit_concat(x, y, 'cholesky')
        else:
            x1 = with_ones(x)
            solve_normal(x1.t() @ x1, x1.t() @ y, 'cholesky')
    assert 'inverse' in str(info.value) and 'lstsq' in str(info.value)


@pytest.mark.parametrize('solver', SOLVER_NAMES)
def test_inf_or_nan_features_raise_non_finite_system(solver):
    """Both solvers refuse inf/NaN in the system with NonFiniteSystem (gelsd would otherwise fail
    with an internal assert, a RuntimeError that is no LinAlgError)."""
    x, y, _, _ = _planted(n=200, c_in=5, c_out=3, seed=4)
    for bad in (float('inf'), float('nan')):
        xb = x.clone()
        xb[7, 2] = bad
        with pytest.raises(NonFiniteSystem):
            fit_concat(xb, y, solver)
        neq = NormalEquations(5, 3, torch.device('cpu'), torch.float64 if solver == 'lstsq' else torch.float32)
        neq.add(xb, y)
        with pytest.raises(NonFiniteSystem):
            solve_normal(neq.gram, neq.rhs, solver)


def test_nan_targets():
    """A NaN in Y: the inverse (finite gram) returns a non-finite solution for the caller to catch,
    the least-squares driver raises NonFiniteSystem."""
    x, y, _, _ = _planted(n=200, c_in=5, c_out=3, seed=5)
    y[3, 1] = float('nan')
    w, b = fit_concat(x, y, 'inverse')
    assert not torch.isfinite(w[:, 1]).any() and torch.isfinite(w[:, 0]).all()
    with pytest.raises(NonFiniteSystem):
        fit_concat(x, y, 'lstsq')
    neq = NormalEquations(5, 3, torch.device('cpu'), torch.float64)
    neq.add(x, y)
    with pytest.raises(NonFiniteSystem):
        solve_normal(neq.gram, neq.rhs, 'lstsq')


def test_float32_gram_overflow_raises_but_float64_lstsq_fits():
    """Features ~1e20 are finite in float32 but overflow [X,1]^T[X,1]: the published inverse raises
    NonFiniteSystem, the float64 least squares (the fallback in quant.qwt) still gives a finite fit.
    (At this scale the ones column falls under LSTSQ_RCOND_X of the largest singular value, so the
    driver drops the bias direction: a useful fit, not the exact one.)"""
    x, y, _, _ = _planted(n=300, c_in=4, c_out=2, seed=6)
    big = x * 1e20
    assert torch.isfinite(big).all()
    with pytest.raises(NonFiniteSystem):
        fit_concat(big, y, 'inverse')
    w, b = fit_concat(big, y, 'lstsq')
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    assert float(r2_score(y, big @ w + b)) > 0.2


def test_inverse_solver_works_in_float32_whatever_it_is_given():
    """The published solver inverts in float32: float64 normal equations give the float32 result."""
    x, y, _, _ = _planted(n=300, c_in=5, c_out=2, seed=7)
    x1 = with_ones(x)
    gram, rhs = x1.t() @ x1, x1.t() @ y
    w32, b32 = solve_normal(gram, rhs, 'inverse')
    w64, b64 = solve_normal(gram.double(), rhs.double(), 'inverse')
    assert w64.dtype == torch.float32 and b64.dtype == torch.float32
    assert torch.equal(w64, w32) and torch.equal(b64, b32)
