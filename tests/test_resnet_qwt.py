"""Percentile + QwT for ResNets (SPEC §3b): one test per constant and branch, each with hand-computed
expected values, the bad-input messages, --save/--load and the model size."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import quant
from conftest import make_tiny_resnet
from quant import qwt_conv
from quant.layers import QuantConv2d
from quant.qwt_conv import (CompensatedConvBlock, check_conv_qwt_args, conv_fit_scores, conv_groups, conv_stride,
                            fit_group_conv)
from quant.saved_model import load_quantized, save_quantized
from utils.core.errors import UserError


def _images(n, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _calibrated(a_bits=4, w_bits=4, conv_input_bits=None, seed=0):
    model = make_tiny_resnet(seed)
    return quant.percentile_ptq(model, _images(4), w_bits, a_bits, conv_input_bits=conv_input_bits)


# --- the ridge solve ------------------------------------------------------------------------------------------
def test_ridge_of_1e3_on_every_diagonal_entry_bias_included():
    """Features [1, -1] (one channel, two positions), targets [4, 2]: A = [[1, 1], [-1, 1]], AᵀA = 2·I,
    Aᵀy = [2, 6], so (AᵀA + λI)⁻¹Aᵀy = [2, 6] / (2 + λ): W = 2/2.001, b = 6/2.001. A ridge on W alone gives
    b = 3, on b alone W = 1, and λ = 1e-2 or 1e-4 moves both by ~5e-4."""
    x = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    y = torch.tensor([4.0, 2.0]).view(1, 1, 1, 2)
    w, b = fit_group_conv(x, y, kernel_size=1, groups=1, stride=1)
    assert w.shape == (1, 1, 1, 1) and b.shape == (1,) and w.dtype == b.dtype == torch.float32
    assert float(w) == pytest.approx(2 / 2.001, rel=1e-6)
    assert float(b) == pytest.approx(6 / 2.001, rel=1e-6)
    assert qwt_conv.RIDGE == 1e-3


def test_groups_fit_their_own_channels():
    """Two groups: output channel j depends only on input channel j (y = 2·x0 + 1, y1 = -3·x1): the fit of each
    group sees its own input channel and its own output channel."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 5, 5, generator=gen)
    y = torch.stack([2 * x[:, 0] + 1, -3 * x[:, 1]], dim=1)
    w, b = fit_group_conv(x, y, kernel_size=1, groups=2, stride=1)
    assert w.shape == (2, 1, 1, 1)
    torch.testing.assert_close(w.flatten(), torch.tensor([2.0, -3.0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(b, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-4)


def test_kernel_3_patches_with_padding_1_recover_a_3x3_convolution():
    """Targets made by a 3x3 convolution with padding 1 and stride 2: the unfolded patches (stride 2,
    padding k // 2) must line up with them for the fit to recover the kernel."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 8, 8, generator=gen)
    w_true = torch.randn(2, 2, 3, 3, generator=gen)
    y = F.conv2d(x, w_true, torch.tensor([0.5, -0.5]), stride=2, padding=1)
    w, b = fit_group_conv(x, y, kernel_size=3, groups=1, stride=2)
    torch.testing.assert_close(w, w_true, rtol=0, atol=1e-3)
    torch.testing.assert_close(b, torch.tensor([0.5, -0.5]), rtol=0, atol=1e-3)


def test_published_defaults_kernel_1_factor_64():
    params = inspect.signature(quant.qwt_compensate).parameters
    assert (params['kernel_size'].default, params['factor'].default) == (1, 64)
    assert (qwt_conv.DEFAULT_KERNEL_SIZE, qwt_conv.DEFAULT_FACTOR) == (1, 64)
    assert [conv_groups(c, 64) for c in (32, 64, 127, 128, 256, 2048)] == [1, 1, 1, 2, 4, 32]


def test_default_compensation_is_1x1_with_64_channels_per_group():
    """Tiny ResNet blocks take 64, 64, 128, 256 channels: groups 1, 1, 2, 4 at factor 64, so every W is
    [C_out, 64, 1, 1] (factor 65 would give [256, 128, 1, 1] in block 2; kernel 3 a 3x3 W)."""
    model = _calibrated()
    quant.qwt_compensate(model, _images(4, seed=2), batch_size=2)
    shapes = [tuple(m.comp_weight.shape) for m in model.modules() if isinstance(m, CompensatedConvBlock)]
    assert shapes == [(64, 64, 1, 1), (128, 64, 1, 1), (256, 64, 1, 1), (512, 64, 1, 1)]


# --- the stride rule ----------------------------------------------------------------------------------------
def test_stride_rule():
    assert conv_stride((2, 4, 8, 8), (2, 4, 8, 8)) == 1
    assert conv_stride((2, 4, 8, 8), (2, 8, 4, 4)) == 2
    assert conv_stride((2, 4, 7, 7), (2, 8, 3, 3)) == 2  # floor, as published
    for out in ((2, 2), (8, 4), (4, 8), (16, 16)):
        with pytest.raises(ValueError, match=rf'^group-convolution QwT needs a block that keeps or halves its '
                                             rf"input's height and width; this one maps 8x8 to {out[0]}x{out[1]}$"):
            conv_stride((1, 4, 8, 8), (1, 4, *out))


# --- r² and its gate ----------------------------------------------------------------------------------------
def test_r2_means_over_samples_only():
    """Y: sample 0 = [1, 3], sample 1 = [3, 5] (one channel, two positions); Ŷ = 3 everywhere (W = 0, b = 3).
    SS_res = 4 + 0 + 0 + 4 = 8; around the per-position mean over samples [2, 4], SS_tot = 4: r² = -1 (around
    the per-channel mean 3, SS_tot = 8 and r² would be 0)."""
    y = torch.tensor([[1.0, 3.0], [3.0, 5.0]]).view(2, 1, 1, 2)
    x = torch.zeros(2, 1, 1, 2)
    r2, abs_err = conv_fit_scores(x, y, torch.zeros(1, 1, 1, 1), torch.tensor([3.0]), stride=1, groups=1)
    assert float(r2) == -1.0 and float(abs_err) == 1.0


@pytest.mark.parametrize('r2,used', [(0.0, False), (1e-7, True), (-0.5, False)])
def test_compensation_is_used_only_where_r2_is_above_0(monkeypatch, r2, used):
    real = qwt_conv.conv_fit_scores
    monkeypatch.setattr(qwt_conv, 'conv_fit_scores', lambda *a: (torch.tensor(r2), real(*a)[1]))
    model = _calibrated()
    stats = []
    quant.qwt_compensate(model, _images(2, seed=2), batch_size=2, stats=stats)
    assert [s['used'] for s in stats] == [used] * 4 and [s['r2'] for s in stats] == [pytest.approx(r2)] * 4
    assert all(bool(m.comp_weight.any()) == used for m in model.modules() if isinstance(m, CompensatedConvBlock))


def test_start_block_counts_across_stages():
    model = _calibrated()
    stats = []
    quant.qwt_compensate(model, _images(4, seed=2), batch_size=2, start_block=2, stats=stats)
    assert [s['block'] for s in stats] == [0, 1, 2, 3]
    assert [s['used'] for s in stats] == [False, False] + [s['r2'] > 0 for s in stats[2:]]
    assert stats[2]['used']  # layer3's block: index 2 across stages
    blocks = [m for m in model.modules() if isinstance(m, CompensatedConvBlock)]
    assert not blocks[0].comp_weight.any() and not blocks[1].comp_bias.any() and blocks[2].comp_weight.any()


# --- fp16 at inference, float32 while fitting ---------------------------------------------------------------
class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_padding_k_over_2_hand_values():
    """x = ones [1, 1, 3, 3], W = ones 3x3, b = 0.5: padding 1 gives 4 at the corners, 6 on the edges, 9 in the
    middle, plus b."""
    block = CompensatedConvBlock(_Zero().eval(), torch.ones(1, 1, 3, 3), torch.tensor([0.5]))
    want = torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]) + 0.5
    assert torch.equal(block(torch.ones(1, 1, 3, 3))[0, 0], want)
    assert torch.equal(block.forward_fp32(torch.ones(1, 1, 3, 3))[0, 0], want)


def test_inference_runs_the_convolution_in_half_precision_then_adds_b():
    """W = 1 + 2^-12 rounds to 1 in fp16: at inference x·W is x, while fitting x·(1 + 2^-12); b is added in
    float32 after the fp16 convolution (b = 2^-13 survives, it would not in fp16 beside 1)."""
    w, b = torch.full((1, 1, 1, 1), 1 + 2 ** -12), torch.tensor([2 ** -13])
    block = CompensatedConvBlock(_Zero().eval(), w, b)
    assert not block.training  # in the model's mode: eval
    x = torch.ones(1, 1, 2, 2)
    assert torch.equal(block(x), torch.full((1, 1, 2, 2), 1 + 2 ** -13))
    assert torch.equal(block.forward_fp32(x), torch.full((1, 1, 2, 2), 1 + 2 ** -12 + 2 ** -13))
    block.enabled = False
    assert torch.equal(block(x), torch.zeros(1, 1, 2, 2))


def test_training_branch_runs_the_convolution_in_float32_with_the_bias():
    """The published training branch (QwT*), same W, b as above: in training mode x·(1 + 2^-12) + 2^-13 in
    float32; the gradient of the summed output over the four positions is dL/dW = 4, dL/db = 4."""
    w, b = torch.full((1, 1, 1, 1), 1 + 2 ** -12), torch.tensor([2 ** -13])
    block = CompensatedConvBlock(_Zero().eval(), w, b).train()
    block.comp_weight.requires_grad_(True)
    block.comp_bias.requires_grad_(True)
    out = block(torch.ones(1, 1, 2, 2))
    assert torch.equal(out, torch.full((1, 1, 2, 2), 1 + 2 ** -12 + 2 ** -13))
    out.sum().backward()
    assert block.comp_weight.grad.tolist() == [[[[4.0]]]] and block.comp_bias.grad.tolist() == [4.0]
    with torch.no_grad():
        assert torch.equal(block.eval()(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 1 + 2 ** -13))


def test_next_block_is_fed_the_float32_form():
    """While fitting, block i + 1 sees block i's compensated output in float32 with the bias (the published
    training-mode pass), not the fp16 inference form."""
    model = _calibrated()
    seen = {}
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    handles = [stage[0].register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, args[0].clone()))
               for i, stage in enumerate(stages)]
    stats = []
    quant.qwt_compensate(model, _images(4, seed=2), batch_size=4, stats=stats)
    for h in handles:
        h.remove()
    used = [s['block'] for s in stats[:3] if s['used']]
    assert used
    with torch.no_grad():
        for i in used:
            comp = stages[i][0]
            assert torch.equal(seen[i + 1], comp.forward_fp32(seen[i])), i
            assert not torch.equal(seen[i + 1], comp(seen[i])), i


# --- which bits -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('a_bits', [2, 4, 6])
def test_conv_inputs_are_8_bit_whatever_a_bits(a_bits):
    model, ref = _calibrated(a_bits=a_bits), _calibrated(a_bits=8)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 1 + 2 + 3 * 3  # stem, layer1's two convs, three per downsampling block
    ref_modules = dict(ref.named_modules())
    for name, m in convs:
        assert m.input_quantizer.n_bits == 8 and not m.input_quantizer.channel_wise, name
        assert torch.equal(m.input_quantizer.delta, ref_modules[name].input_quantizer.delta), name
    assert model.fc.input_quantizer.n_bits == 8
    levels = model.layer2[0].conv1.input_quantizer(torch.linspace(-3, 3, 10000)).unique().numel()
    assert 16 < levels <= 256


def test_conv_input_bits_opt_in_sets_every_conv_but_the_stem():
    model = _calibrated(a_bits=4, conv_input_bits=4)
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            assert m.input_quantizer.n_bits == (8 if name == 'conv1' else 4), name
    assert model.fc.input_quantizer.n_bits == 8
    levels = model.layer2[0].conv1.input_quantizer(torch.linspace(-3, 3, 10000)).unique().numel()
    assert levels <= 16


def test_stem_and_fc_weights_are_8_bit_the_rest_w_bits():
    model = _calibrated(w_bits=3)
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            assert m.weight_quantizer.n_bits == (8 if name == 'conv1' else 3) and m.weight_quantizer.channel_wise
    assert model.fc.weight_quantizer.n_bits == 8
    assert model.conv1.weight_quantizer(model.conv1.weight)[0].unique().numel() > 8
    assert model.layer1[0].conv1.weight_quantizer(model.layer1[0].conv1.weight)[0].unique().numel() <= 8
    assert model.layer1[0].bn1.__class__ is nn.BatchNorm2d  # BatchNorm not folded


def test_a_bits_out_of_range_is_refused():
    with pytest.raises(ValueError, match='bit width 9 not supported'):
        _calibrated(a_bits=9)


# --- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kernel', [0, 2, -1, 4])
def test_bad_kernel_size(kernel):
    with pytest.raises(UserError, match=rf'^--kernel_size {kernel} is not an odd size >= 1 \(padding k // 2 keeps '
                                        r"the block's output size only for odd k\): use 1 \(published default\) or 3$"):
        check_conv_qwt_args(kernel, 64)


@pytest.mark.parametrize('factor', [0, -64])
def test_bad_factor(factor):
    with pytest.raises(UserError, match=rf'^--factor {factor} must be a whole number >= 1 \(input channels per '
                                        r'group\): use 64 \(published default\)$'):
        check_conv_qwt_args(1, factor)


def test_factor_that_does_not_split_the_channels():
    """256 // 48 = 5 groups, which split neither 256 input nor 256 output channels."""
    check_conv_qwt_args(3, 64, [(64, 256), (256, 512), (2048, 2048)])
    with pytest.raises(UserError, match=r'^--factor 48 makes 5 groups of 256 input channels, which do not split 256 '
                                        r'input and 256 output channels evenly: use a factor that divides the channel '
                                        r'counts, such as 64 \(published default\)$'):
        check_conv_qwt_args(1, 48, [(64, 64), (256, 256)])


def test_qwt_compensate_refuses_bad_arguments_before_fitting(monkeypatch):
    model = _calibrated()
    monkeypatch.setattr(qwt_conv, 'fit_block', lambda *a: pytest.fail('fitted'))
    with pytest.raises(UserError, match='^--kernel_size 2 '):
        quant.qwt_compensate(model, _images(2), kernel_size=2)
    with pytest.raises(UserError, match="QwT for ResNets has the published ridge solver only"):
        quant.qwt_compensate(model, _images(2), solver='lstsq')


# --- save / load, size -----------------------------------------------------------------------------------------
@pytest.mark.parametrize('conv_input_bits', [None, 4])
def test_save_load_round_trips_a_compensated_resnet(tmp_path, conv_input_bits):
    model = _calibrated(conv_input_bits=conv_input_bits)
    quant.qwt_compensate(model, _images(4, seed=2), batch_size=2, kernel_size=3, factor=16)
    path = str(tmp_path / 'q.pth')
    save_quantized(model, path, 'tiny', 'tiny', 4, 4)
    loaded, payload = load_quantized(path, model=make_tiny_resnet(seed=5))
    assert payload['conv_input_bits'] == (8 if conv_input_bits is None else 4)
    x = _images(3, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    blocks = [m for m in loaded.modules() if isinstance(m, CompensatedConvBlock)]
    assert len(blocks) == 4 and blocks[3].comp_weight.shape == (512, 16, 3, 3)
    assert loaded.layer2[0].block.conv2.input_quantizer.n_bits == payload['conv_input_bits']


def test_saved_resnet18_loads_by_name(tmp_path):
    torch.manual_seed(0)
    model = models.randomize_batchnorms(models.build_model('resnet18', pretrained=False))
    quant.percentile_ptq(model, _images(2), 4, 4)
    path = str(tmp_path / 'q.pth')
    save_quantized(model, path, 'resnet18', 'resnet18', 4, 4)
    loaded, _ = load_quantized(path)
    x = _images(1, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_compensation_weight_counts_16_bits():
    """Default compensation of the tiny ResNet: W numels 64·64 + 128·64 + 256·64 + 512·64 = 61440 at 16 bits,
    b 64 + 128 + 256 + 512 = 960 at 32 bits: (983040 + 30720) / 8 / 1e6 = 0.12672 MB more."""
    model = _calibrated()
    before = quant.model_size_mb(model)
    quant.qwt_compensate(model, _images(4, seed=2), batch_size=2)
    assert quant.model_size_mb(model, include_compensation=False) == pytest.approx(before, abs=1e-12)
    assert quant.model_size_mb(model) - before == pytest.approx(0.12672, abs=1e-9)


# --- fp16 overflow guard (not in the published code) -------------------------------------------------------------
def _ridge_reference(x, y):
    """float64 numpy ridge of SPEC §3b for k = 1, one group: rows = positions of every sample, plus ones."""
    import numpy as np
    a = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double().numpy()
    a = np.hstack([a, np.ones((len(a), 1))])
    t = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double().numpy()
    sol = np.linalg.solve(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ t)
    return torch.from_numpy(sol[:-1].T.copy()), torch.from_numpy(sol[-1].copy())


@pytest.mark.parametrize('scale,left_out', [(1e7, True), (10.0, False)])
def test_a_group_conv_fit_beyond_half_precision_is_left_out(scale, left_out):
    """X ~ 0.01 N(0, 1) [8, 2, 4, 4], target Y = scale x (X with its channels swapped): the ridge fit is W ~ scale
    (r² near 1). At 1e7 W.half() would be inf (NaN logits at inference): the block gets zeros, fp16_overflow is
    the largest |W| of the float64 reference, and the next features are the plain quantized output (zeros
    here); at 10 the fit is kept."""
    from utils.core.timing import Stopwatch
    g = torch.Generator().manual_seed(4)
    xs = [0.01 * torch.randn(8, 2, 4, 4, generator=g)]
    target = lambda x: scale * x.flip(1)  # noqa: E731
    w_ref, b_ref = _ridge_reference(xs[0], target(xs[0]))
    block = _Zero().eval()
    clock = Stopwatch('cpu', ('passes', 'fit'))
    fit = qwt_conv.GroupConv().fit(block, lambda x: (target(x), block(x)), xs, True, clock)
    assert fit.r2 > 0.9
    if left_out:
        assert float(w_ref.abs().max()) > 65504
        assert fit.fp16_overflow == pytest.approx(float(w_ref.abs().max()), rel=1e-3)
        assert not fit.used and not fit.weight.any() and not fit.bias.any()
        assert torch.equal(fit.outs[0], torch.zeros(8, 2, 4, 4))
    else:
        assert fit.fp16_overflow is None and fit.used
        torch.testing.assert_close(fit.weight.reshape(2, 2).double(), w_ref, rtol=1e-3, atol=1e-3)
        want = F.conv2d(xs[0], w_ref.float().view(2, 2, 1, 1), b_ref.float())  # the ridge shrinks W: not Y itself
        torch.testing.assert_close(fit.outs[0], want, rtol=0, atol=1e-5)


def test_an_overflowing_group_conv_block_is_one_warning_and_recorded(monkeypatch, caplog):
    """Through qwt_compensate on the tiny ResNet: block 1's fit scaled by 1e9 (its r² set to 0.5) is one WARNING
    naming block 1 and its largest value; stats say fp16_overflow and not used; the logits stay finite."""
    real_fit, real_scores, fits = qwt_conv.fit_group_conv, qwt_conv.conv_fit_scores, []

    def huge(*a, **k):
        w, b = real_fit(*a, **k)
        fits.append(w)
        return (w * 1e9, b) if len(fits) == 2 else (w, b)
    monkeypatch.setattr(qwt_conv, 'fit_group_conv', huge)
    monkeypatch.setattr(qwt_conv, 'conv_fit_scores',
                        lambda *a: (torch.tensor(0.5), real_scores(*a)[1]) if len(fits) == 2 else real_scores(*a))
    model, stats = _calibrated(), []
    with caplog.at_level('WARNING', logger='quant.qwt'):
        quant.qwt_compensate(model, _images(4, seed=2), batch_size=2, stats=stats)
    assert [s['fp16_overflow'] for s in stats] == [False, True, False, False]
    assert [s['used'] for s in stats] == [s['r2'] > 0 and s['block'] != 1 for s in stats] and stats[2]['used']
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    peak = float(fits[1].abs().max()) * 1e9
    assert warnings == [f'QwT block 1: its fit (r2 0.5) holds values up to {peak:.3g}, beyond half precision (65504), '
                        'so the fp16 compensation at inference would give inf and NaN logits; the block is left '
                        'uncompensated. Hint: more --qwt_samples.']
    blocks = [m for m in model.modules() if isinstance(m, CompensatedConvBlock)]
    assert not blocks[1].comp_weight.any() and blocks[2].comp_weight.any()
    with torch.no_grad():
        assert torch.isfinite(model(_images(2, seed=7))).all()
    # the end-of-run line of a ResNet run (qwt_resnet.py refuses --qwt_solver, whatever result.json records)
    from utils.run.record import summary_lines
    left = sum(not s['used'] for s in stats)
    record = {'model': 'resnet18', 'w_bits': 4, 'a_bits': 4, 'num_val': 2, 'world_size': 1, 'fp_top1': None,
              'ptq_size_mb': None, 'qwt_blocks': stats, 'skipped_images': [], 'timings': {}, 'kernel_size': 1,
              'qwt_solver': 'inverse'}
    assert f'QwT: {4 - left} of 4 blocks compensated, {left} left out (1 whose fit overflows half precision: ' \
           'block 1; more --qwt_samples)' in summary_lines(record)


def test_a_nan_r2_is_explained_on_its_log_line(monkeypatch, caplog):
    """r² = 1 - 0/0 (a block whose error is the same on every image): zero compensation, and the INFO line says
    why (the figures branch's note, kept by the shared QwT loop)."""
    real = qwt_conv.conv_fit_scores
    monkeypatch.setattr(qwt_conv, 'conv_fit_scores', lambda *a: (torch.tensor(float('nan')), real(*a)[1]))
    stats = []
    with caplog.at_level('INFO', logger='quant.qwt'):
        quant.qwt_compensate(_calibrated(), _images(2, seed=2), batch_size=2, stats=stats)
    infos = [r.getMessage() for r in caplog.records if r.levelname == 'INFO']
    assert len(infos) == 4 and all(m.startswith(f'QwT block {i}: r2 nan, mean abs residual ') for i, m in enumerate(infos))
    assert all(m.endswith(', zero compensation' + qwt_conv.NAN_R2) for m in infos)
    assert [(s['r2'], s['used']) for s in stats] == [(None, False)] * 4
