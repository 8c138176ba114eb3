"""Two gloo processes on the CPU and the group-convolution QwT (SPEC §3b): the fit uses every rank's
features (gathered as published), so it equals the one-process fit on all images bit for bit; and every rank
ends with rank 0's W, b and r² (broadcast), even where a rank's own solve came out different."""
import copy

import pytest
import torch
import torch.distributed as dist

import quant
from conftest import free_port, gloo_group, make_tiny_resnet, run_ranks
from quant import qwt_conv

WORLD = 2
N_QWT = 8
BATCH = 2


def _fit(model, images, perturb_rank=None):
    """(W, b of every block, stats) after QwT; ``perturb_rank``: that rank's solve is moved, as if its
    arithmetic differed."""
    real = qwt_conv.fit_group_conv

    def fit(*a, **k):
        w, b = real(*a, **k)
        if perturb_rank is not None and dist.is_initialized() and dist.get_rank() == perturb_rank:
            w, b = w + 1.0, b + 1.0
        return w, b
    qwt_conv.fit_group_conv = fit
    try:
        stats = []
        quant.qwt_compensate(model, images, batch_size=BATCH, factor=32, stats=stats)
    finally:
        qwt_conv.fit_group_conv = real
    comps = [(m.comp_weight.detach().clone(), m.comp_bias.detach().clone()) for m in model.modules()
             if isinstance(m, quant.CompensatedConvBlock)]
    return comps, stats


def _worker(rank, port, setup_path, out_path):
    with gloo_group(rank, WORLD, port):
        setup = torch.load(setup_path, weights_only=False)
        mine = setup['images'][rank * N_QWT // WORLD:(rank + 1) * N_QWT // WORLD]
        out = {'plain': _fit(copy.deepcopy(setup['model']), mine),
               'perturbed': _fit(copy.deepcopy(setup['model']), mine, perturb_rank=1)}
        torch.save(out, out_path.format(rank=rank))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('resnet_dist')
    model = quant.percentile_ptq(make_tiny_resnet(), torch.randn(2, 3, 32, 32), 4, 4)
    images = torch.randn(N_QWT, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.save({'model': model, 'images': images}, tmp / 'setup.pt')
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # compare at one thread, as the workers run (4-bit sums are order-sensitive)
    try:
        single = _fit(copy.deepcopy(model), images)
    finally:
        torch.set_num_threads(old)
    out_path = str(tmp / 'rank{rank}.pt')
    run_ranks(_worker, (free_port(), str(tmp / 'setup.pt'), out_path), WORLD)
    torch.set_num_threads(old)
    return single, [torch.load(out_path.format(rank=r), weights_only=False) for r in range(WORLD)]


def test_two_ranks_fit_what_one_process_fits_on_all_images(runs):
    (single_comps, single_stats), multi = runs
    assert any(s['used'] for s in single_stats)
    for rank in multi:
        comps, stats = rank['plain']
        assert stats == single_stats
        for (w, b), (w1, b1) in zip(comps, single_comps):
            assert torch.equal(w, w1) and torch.equal(b, b1)


def test_every_rank_keeps_rank_0s_fit(runs):
    """Rank 1's own solves are moved by +1; both ranks still end with rank 0's (unmoved) W, b and decisions."""
    (single_comps, single_stats), multi = runs
    for rank in multi:
        comps, stats = rank['perturbed']
        assert stats == single_stats
        for (w, b), (w1, b1) in zip(comps, single_comps):
            assert torch.equal(w, w1) and torch.equal(b, b1)
