"""Two gloo processes on the CPU give the same QwT compensation and the same evaluation counts as
one process (SPEC §3, §4)."""
import contextlib
import copy
import os
import socket

import pytest
import torch
from torch.utils.data import TensorDataset

import quant
from conftest import gloo_group, make_tiny_vit, run_ranks
from quant.qwt import compensated_blocks, qwt_compensate
from utils.core import distributed
from utils.run import data
from utils.core.distributed import DistInfo
from utils.run.evaluate import evaluate

WORLD = 2
N_QWT = 16
QWT_BATCH = 4
N_EVAL = 13  # odd: the two shards differ in size
# accumulate modes; 'normal-fallback': the float32 inverse fails in every block and the moments
# decline, so the float64 retry and the SS_res measured on the tokens are all-reduced too;
# '-diverge': rank 1 alone sees other numbers (as another cuDNN algorithm or GPU could give it)
MODES = ('normal', 'concat', 'normal-fallback', 'normal-diverge', 'concat-diverge')
GROUP_TIMEOUT_S = 30  # a collective one rank never joins fails after this, instead of hanging the suite


@contextlib.contextmanager
def _diverged(rank):
    """On rank 1 only: block 0's moments decline (rank 1 alone would measure SS_res on its tokens, an
    all_reduce rank 0 never joins), block 1's inverse fails (rank 1 alone would retry in float64, with
    all-reduces of its own) and block 2's r² is negative (rank 1 alone would drop the block). Rank 0's
    decisions must win on both ranks."""
    from quant import qwt_linear as qwt_module  # the token-wise kind's fit
    if rank != 1:
        yield
        return
    saved = {n: getattr(qwt_module, n) for n in ('solve_normal', 'fit_concat', 'moment_ss_res', 'r2_score')}
    solves, moments, r2s = [], [], []

    def failing(real):
        def solve(a, b, solver='inverse'):
            if solver == 'inverse':
                solves.append(1)
                if len(solves) == 2:
                    raise torch.linalg.LinAlgError('forced on rank 1 by the test')
            return real(a, b, solver)
        return solve

    def moment(gram, rhs, y_sq, w1):
        moments.append(1)
        real = saved['moment_ss_res'](gram, rhs, y_sq, w1)
        return None if len(moments) == 1 else 10 * y_sq if len(moments) == 3 else real

    def r2(y, pred):
        r2s.append(1)
        return torch.tensor(-1.0) if len(r2s) == 3 else saved['r2_score'](y, pred)
    qwt_module.solve_normal, qwt_module.fit_concat = failing(saved['solve_normal']), failing(saved['fit_concat'])
    qwt_module.moment_ss_res, qwt_module.r2_score = moment, r2
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(qwt_module, name, fn)


@contextlib.contextmanager
def _forced_fallback():
    from quant import qwt_linear as qwt_module  # the token-wise kind's fit
    real_solve, real_moment = qwt_module.solve_normal, qwt_module.moment_ss_res

    def solve(gram, rhs, solver='inverse'):
        if solver == 'inverse':
            raise torch.linalg.LinAlgError('forced by the test')
        return real_solve(gram, rhs, solver)
    qwt_module.solve_normal, qwt_module.moment_ss_res = solve, lambda *args: None
    try:
        yield
    finally:
        qwt_module.solve_normal, qwt_module.moment_ss_res = real_solve, real_moment


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _comp_state(model):
    return [(c.comp_weight.detach().clone(), c.comp_bias.detach().clone()) for c in compensated_blocks(model)]


def _run_all(model, qwt_images, eval_images, eval_targets, dist_info):
    """What each process does (also run by the parent as the one-process reference)."""
    out = {}
    for mode in MODES:
        m = copy.deepcopy(model)
        stats = []
        with (_forced_fallback() if mode.endswith('fallback') else _diverged(dist_info.rank) if mode.endswith('diverge')
              else contextlib.nullcontext()):
            qwt_compensate(m, qwt_images, batch_size=QWT_BATCH, accumulate=mode.split('-')[0], stats=stats)
        out[mode] = {'comp': _comp_state(m), 'stats': stats}
        if mode == 'normal':
            compensated = m
    loader = data.eval_loader(TensorDataset(eval_images, eval_targets), 4, 0, dist_info)
    out['seen'] = sum(len(t) for _, t in loader)
    out['eval'] = evaluate({'repq': model, 'qwt': compensated}, loader, torch.device('cpu'))
    return out


def _worker(rank, port, setup_path, out_path):
    with gloo_group(rank, WORLD, port, GROUP_TIMEOUT_S):
        setup = torch.load(setup_path, weights_only=False)
        per_rank = N_QWT // WORLD
        mine = setup['qwt_images'][rank * per_rank:(rank + 1) * per_rank]
        info = DistInfo(rank=distributed.rank(), world_size=distributed.world_size())
        res = _run_all(setup['model'], mine, setup['eval_images'], setup['eval_targets'], info)
        res['rank'], res['world_size'] = info.rank, info.world_size
        torch.save(res, out_path.format(rank=rank))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('dist')
    torch.manual_seed(0)
    model = make_tiny_vit(seed=0)
    g = torch.Generator().manual_seed(42)
    calib = torch.randn(8, 3, 32, 32, generator=g)
    qwt_images = torch.randn(N_QWT, 3, 32, 32, generator=g)
    eval_images = torch.randn(N_EVAL, 3, 32, 32, generator=g)
    quant.repq_vit(model, calib, 4, 4)
    with torch.no_grad():
        pred = model(eval_images).argmax(1)
    # Some targets the model gets right, the rest random: non-trivial top-1 / top-5 counts.
    eval_targets = torch.where(torch.arange(N_EVAL) % 2 == 0, pred, torch.randint(0, 10, (N_EVAL,), generator=g))
    setup_path = str(tmp / 'setup.pt')
    torch.save({'model': model, 'qwt_images': qwt_images, 'eval_images': eval_images,
                'eval_targets': eval_targets}, setup_path)

    single = _run_all(model, qwt_images, eval_images, eval_targets, DistInfo())
    half = copy.deepcopy(model)
    qwt_compensate(half, qwt_images[:N_QWT // WORLD], batch_size=QWT_BATCH)
    single['half_only'] = _comp_state(half)

    out_path = str(tmp / 'rank{rank}.pt')
    env_keys = ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK')
    saved_env = {k: os.environ.get(k) for k in env_keys}
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    port = _free_port()
    os.environ['MASTER_PORT'] = str(port)
    try:
        run_ranks(_worker, (port, setup_path, out_path), WORLD)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    multi = [torch.load(out_path.format(rank=r), weights_only=False) for r in range(WORLD)]
    return single, multi


def test_workers_ran_as_a_group(runs):
    single, multi = runs
    assert [m['rank'] for m in multi] == [0, 1]
    assert all(m['world_size'] == WORLD for m in multi)
    assert not distributed.is_initialized()  # the parent stayed a single process


@pytest.mark.parametrize('mode', MODES)
def test_two_processes_give_the_same_compensation(runs, mode):
    single, multi = runs
    ref = single[mode]['comp']
    assert len(ref) == 3
    assert all(s['used'] for s in single[mode]['stats'])
    assert [s['fallback'] for s in single[mode]['stats']] == ['lstsq' if mode.endswith('fallback') else None] * 3
    for m in multi:
        assert [s['used'] for s in m[mode]['stats']] == [s['used'] for s in single[mode]['stats']]
        for i, ((w, b), (w_ref, b_ref)) in enumerate(zip(m[mode]['comp'], ref)):
            scale = float(w_ref.abs().max())
            assert scale > 0
            torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-4 * scale, msg=f'{mode} block {i} W, rank {m["rank"]}')
            torch.testing.assert_close(b, b_ref, rtol=0, atol=1e-4 * scale, msg=f'{mode} block {i} b, rank {m["rank"]}')
        for s, s_ref in zip(m[mode]['stats'], single[mode]['stats']):
            assert s['r2'] == pytest.approx(s_ref['r2'], abs=1e-4)
    # Both ranks solve the same all-reduced / gathered system.
    for (w0, b0), (w1, b1) in zip(multi[0][mode]['comp'], multi[1][mode]['comp']):
        torch.testing.assert_close(w0, w1, rtol=0, atol=1e-6 * float(w0.abs().max()))
        torch.testing.assert_close(b0, b1, rtol=0, atol=1e-6 * float(w0.abs().max()))


def test_half_the_images_alone_give_a_different_fit(runs):
    """Guards the comparison above: a rank that fitted on its own 8 images would not match."""
    single, _ = runs
    for (w_half, _), (w_all, _) in zip(single['half_only'], single['normal']['comp']):
        assert float((w_half - w_all).abs().max()) > 1e-2 * float(w_all.abs().max())


def test_sharded_evaluation_counts_equal_one_process(runs):
    single, multi = runs
    assert single['seen'] == N_EVAL
    assert [m['seen'] for m in multi] == [(N_EVAL + 1) // 2, N_EVAL // 2]
    for name in ('repq', 'qwt'):
        ref = single['eval'][name]
        assert ref['count'] == N_EVAL
        assert 0 < ref['correct1'] <= ref['correct5'] <= N_EVAL
        for m in multi:
            got = m['eval'][name]
            for key in ('correct1', 'correct5', 'count'):
                assert got[key] == ref[key], (name, key, got[key], ref[key])
            assert got['top1'] == pytest.approx(ref['top1']) and got['top5'] == pytest.approx(ref['top5'])


@pytest.mark.parametrize('mode', ('normal', 'concat'))
def test_a_rank_that_sees_other_numbers_follows_rank_0(runs, mode):
    """Hazard (NCCL hang): rank 1 alone fails a solve, sees its moments decline and a negative r². Every
    decision is rank 0's, so both ranks finish (within the group's timeout: a collective joined by one
    rank only would raise there) with rank 0's W, b bit for bit, the same decisions, and the same result
    as the group without any divergence."""
    single, multi = runs
    for m in multi:
        assert [s['used'] for s in m[f'{mode}-diverge']['stats']] == [True, True, True]
        assert [s['fallback'] for s in m[f'{mode}-diverge']['stats']] == [None, None, None]
        assert m[f'{mode}-diverge']['stats'] == multi[0][mode]['stats']
        for (w, b), (w_ref, b_ref) in zip(m[f'{mode}-diverge']['comp'], multi[0][mode]['comp']):
            assert torch.equal(w, w_ref) and torch.equal(b, b_ref)
    assert single[f'{mode}-diverge']['stats'] == single[mode]['stats']  # rank 0 alone sees nothing odd
