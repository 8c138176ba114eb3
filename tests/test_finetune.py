"""QwT* library pieces (quant/finetune, the straight-through quantizers): hand-computed gradients, what one
optimizer step may change, zero-initialised blocks' gradients, the wrappers' training branch, bad configs."""
import copy
import dataclasses
import functools
import importlib.util
import math
import os
import re

import numpy as np
import pytest
import torch

import quant
from conftest import ROOT, make_tiny_resnet, make_tiny_swin, make_tiny_vit
from quant.finetune import FinetuneConfig, finetune, prepare_for_finetune, trainable_parameters
from quant.finetune.data import epoch_items
from quant.qwt import CompensatedBlock, compensated_blocks
from quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from utils.core.errors import UserError

PUBLISHED_QUANTIZER = os.path.join(ROOT, '..', 'shared', 'published-qwt', 'quant', 'quantizer.py')
SQ2 = math.sqrt(2)


def _uniform(n_bits, delta, zero_point, channel_wise=False, straight_through=True):
    q = UniformQuantizer(n_bits, channel_wise)
    q.delta, q.zero_point, q.inited = torch.as_tensor(delta), torch.as_tensor(zero_point), True
    q.straight_through = straight_through
    return q


def _log(n_bits, delta):
    q = LogSqrt2Quantizer(n_bits)
    q.delta, q.inited, q.straight_through = torch.as_tensor(delta), True, True
    return q


def _grad(quantizer, x, upstream):
    x = x.clone().requires_grad_()
    out = quantizer(x)
    out.backward(upstream)
    return out.detach(), x.grad


def test_uniform_straight_through_gradient_by_hand():
    """4 bits, delta 0.5, zp 2: levels round(x / 0.5) + 2 are 4, -1 (clamped), 14, 16 (clamped), 9.5 -> 10:
    the gradient passes unchanged inside (0, 15) and is 0 where the clamp held the level. (At the bounds
    themselves torch 2.14's clamp passes none; the comparison with the published quantizers covers them.)"""
    x = torch.tensor([1.0, -1.4, 6.0, 7.1, 3.9])
    up = torch.tensor([0.3, -0.7, 1.5, 2.0, -0.25])
    out, grad = _grad(_uniform(4, 0.5, 2.0), x, up)
    assert torch.equal(out, torch.tensor([1.0, -1.0, 6.0, 6.5, 4.0]))  # (clamp(level) - 2) * 0.5
    assert torch.equal(grad, torch.tensor([0.3, 0.0, 1.5, 0.0, -0.25]))


def test_without_qwtstar_the_quantizers_keep_the_inference_form_bit_for_bit():
    """Straight-through only where QwT* switches it on: otherwise, gradient mode or not, the in-place form
    as before, signed zeros included (round(-0.2) = -0.0 stays -0.0; the published graph gives +0.0), and no
    gradient passes round (as before)."""
    x = torch.tensor([-0.2, 1.0, -1.4, 6.0])
    plain = _uniform(4, 0.5, 2.0, straight_through=False)
    out, grad = _grad(plain, x, torch.ones(4))
    assert torch.equal(torch.signbit(out), torch.tensor([True, False, True, False]))
    assert not grad.any()
    ste_out, ste_grad = _grad(_uniform(4, 0.5, 2.0), x, torch.ones(4))
    assert torch.equal(out, ste_out) and not bool(torch.signbit(ste_out[0]))
    assert torch.equal(ste_grad, torch.tensor([1.0, 1.0, 0.0, 1.0]))


def _log_grad_by_hand(x, delta, n_bits):
    """The published log-√2 graph differentiated by hand: x̂ = delta · 2^-ceil(q/2) · (1 + (q mod 2)(√2 - 1)),
    q = round(-2 log2(x / delta)); round and ceil pass gradients straight through, (q mod 2) has slope 1."""
    u = x / delta
    q = round(-2 * math.log2(u))
    if u <= 1e-6 or not 0 < q < 2 ** n_bits - 1:  # the clamp (torch's: none at its bounds) or the mask stops it
        return 0.0
    c = math.ceil(q / 2)
    odd = 1 + (q % 2) * (SQ2 - 1)
    dxhat_dq = delta * 2 ** -c * ((SQ2 - 1) - math.log(2) / 2 * odd)
    return dxhat_dq * (-2 / (u * math.log(2))) / delta


def test_log_sqrt2_straight_through_gradient_by_hand():
    delta, n_bits = 0.8, 3
    xs = [0.3, 0.5, 0.07, 0.01, 1e-8]  # levels 3, 1, 7 (the top one), 13 (masked), below the 1e-6 clamp
    out, grad = _grad(_log(n_bits, delta), torch.tensor(xs), torch.ones(len(xs)))
    expected_out = [delta * 2 ** -2 * SQ2, delta * 2 ** -1 * SQ2, delta * 2 ** -4 * SQ2, 0.0, 0.0]
    torch.testing.assert_close(out, torch.tensor(expected_out), rtol=1e-6, atol=0)
    expected = [_log_grad_by_hand(x, delta, n_bits) for x in xs]
    assert expected[0] != 0 and expected[1] != 0 and expected[2:] == [0.0, 0.0, 0.0]
    torch.testing.assert_close(grad, torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_log_sqrt2_inference_form_takes_nan_to_zero_instead_of_reading_outside_its_table():
    """A diverging QwT* run feeds NaN to the quantizers; the table form must not index with NaN (an IndexError
    on the CPU, a device-side assert on CUDA). Every number keeps the reference's value."""
    from quant.quantizers import log_sqrt2_fake_quant, log_sqrt2_fake_quant_reference
    x = torch.tensor([float('nan'), 0.3, float('inf'), 0.0, -1.0, 1e-9, 0.8])
    out = log_sqrt2_fake_quant(x, torch.tensor(0.8), 3)
    assert out[0] == 0
    assert torch.equal(out[1:], log_sqrt2_fake_quant_reference(x[1:], torch.tensor(0.8), 3))


@pytest.mark.skipif(not os.path.isfile(PUBLISHED_QUANTIZER), reason='the published QwT code is not in ../shared')
def test_straight_through_gradients_equal_the_published_quantizers():
    """Values and gradients bit for bit against the published quantizer.py (its RoundSTE / Log2STE graph),
    boundary levels included, layer-wise, channel-wise, fractional zero point and log-√2."""
    spec = importlib.util.spec_from_file_location('published_quantizer', PUBLISHED_QUANTIZER)
    pub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pub)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 6, generator=g) * 3
    up = torch.randn(x.shape, generator=g)
    cases = []
    for channel_wise in (False, True):
        ours = UniformQuantizer(4, channel_wise)
        ours(x)
        ours.straight_through = True
        cases.append((ours, x))
        frac = _uniform(4, ours.delta, ours.zero_point + 0.25, channel_wise)
        cases.append((frac, x))
    attn = torch.randn(2, 3, 9, 9, generator=g).softmax(-1)
    log_q = LogSqrt2Quantizer(4)
    log_q(attn)
    log_q.straight_through = True
    cases.append((log_q, attn))
    for ours, inp in cases:
        if isinstance(ours, LogSqrt2Quantizer):
            theirs = pub.LogSqrt2Quantizer(4)
        else:
            theirs = pub.UniformQuantizer(4, ours.channel_wise)
            theirs.zero_point = ours.zero_point
        theirs.delta, theirs.inited = ours.delta, True
        u = torch.randn(inp.shape, generator=g)
        out, grad = _grad(ours, inp, u)
        out_p, grad_p = _grad(theirs, inp, u)
        assert torch.equal(out, out_p) and torch.equal(grad, grad_p)
        assert torch.equal(out, ours(inp))  # the differentiable form gives the inference values
        assert bool((grad != 0).any()) and bool((grad == 0).any())


@functools.lru_cache(maxsize=None)
def _qwt_model(kind):
    """A tiny W4/A4 model with QwT, blocks 0 and 1 left at zero compensation (start_block 2)."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(16, 3, 32, 32, generator=g)
    if kind == 'resnet':
        model = make_tiny_resnet()
        quant.percentile_ptq(model, images[:8], 4, 4)
    else:
        model = make_tiny_swin() if kind == 'swin' else make_tiny_vit(distilled=kind == 'deit')
        quant.repq_vit(model, images[:8], 4, 4)
    quant.qwt_compensate(model, images, start_block=2, batch_size=8, solver='lstsq' if kind == 'swin' else 'inverse')
    return model


def _model(kind):
    return copy.deepcopy(_qwt_model(kind))


BLOCKS = {'vit': [f'blocks.{i}' for i in range(3)], 'deit': [f'blocks.{i}' for i in range(3)],
          'swin': [f'layers.{s}.blocks.{i}' for s in range(2) for i in range(2)],
          'resnet': [f'layer{s}.0' for s in range(1, 5)]}
HEADS = {'vit': ['head'], 'deit': ['head', 'head_dist'], 'swin': ['head'], 'resnet': ['fc']}


class Images(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(9)
        self.x, self.y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.mark.parametrize('kind', ['vit', 'deit', 'swin', 'resnet'])
def test_one_step_changes_only_the_compensation_and_the_heads(kind, tmp_path):
    """Every other parameter and every buffer (quantizer delta / zero point, BatchNorm statistics) stays bit
    for bit; every trainable tensor moves, the zero-initialised blocks' included; the model ends in eval mode."""
    model = _model(kind)
    expected = [f'{b}.comp_{w}' for b in BLOCKS[kind] for w in ('weight', 'bias')] + \
               [f'{h}.{w}' for h in HEADS[kind] for w in ('weight', 'bias')]
    assert sorted(trainable_parameters(model)) == sorted(expected)
    assert not compensated_blocks(model)[0].comp_weight.any()  # block 0 starts from zeros
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(epochs=1, batch_size=4, max_images=4, lr=1e-2, loss='label', workers=0)
    result = finetune(model, Images(), config, str(tmp_path / 'ck.pt'), 'cpu', progress=False)
    assert (result.steps, result.images_seen) == (1, 4)
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(expected)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(getattr(m, 'straight_through', False) for m in model.modules())  # inference form again


def _captured_gradients(model, images, labels):
    """Each CompensatedBlock's input x and output gradient g from one backward pass of the label loss."""
    seen = {}

    def hook(module, inputs, output):
        seen[module] = {'x': inputs[0].detach()}
        output.register_hook(lambda g: seen[module].__setitem__('g', g.detach()))

    handles = [m.register_forward_hook(hook) for m in compensated_blocks(model)]
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    for h in handles:
        h.remove()
    return seen


def test_zero_initialised_blocks_receive_the_gradient_of_the_linear_term():
    """out = block(x) + x @ W + b: dL/dW = Σ_tokens xᵀ g and dL/db = Σ_tokens g (computed from the captured
    x and g, not by the model), non-zero for the blocks that start from zeros."""
    model = _model('vit')
    prepare_for_finetune(model)
    data = Images()
    seen = _captured_gradients(model, data.x[:4], data.y[:4])
    for i, block in enumerate(compensated_blocks(model)):
        x, g = seen[block]['x'].reshape(-1, 48), seen[block]['g'].reshape(-1, 48)
        if i < 2:
            assert not block.comp_weight.any() and not block.comp_bias.any()
        assert float(block.comp_weight.grad.abs().max()) > 0 and float(block.comp_bias.grad.abs().max()) > 0
        torch.testing.assert_close(block.comp_weight.grad, x.T @ g, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(block.comp_bias.grad, g.sum(0), rtol=1e-4, atol=1e-7)


def test_wrappers_train_in_float32_and_infer_in_half_precision():
    """After prepare_for_finetune only the wrappers are in training mode (the quantized blocks, LayerNorm,
    the model stay in eval): the published float32 branch block(x) + x @ W + b. finetune() ends in eval:
    (x.half() @ W.half()).float() + b. Needs the wrappers' training branch (branch qwt-core)."""
    model = _model('deit')
    prepare_for_finetune(model)
    assert not model.training and not any(m.training for m in model.modules() if not isinstance(m, CompensatedBlock))
    block = compensated_blocks(model)[2]
    assert block.training and block.comp_weight.any()
    x = torch.randn(2, 6, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        inner = block.block(x)
        fp32 = inner + x @ block.comp_weight + block.comp_bias
        fp16 = inner + (x.half() @ block.comp_weight.half()).float() + block.comp_bias
        assert not torch.equal(fp32, fp16)
        assert torch.equal(block(x), fp32)
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)  # the distilled DeiT's averaged heads (eval)
        model.eval()
        assert torch.equal(block(x), fp16)


def test_epoch_order_two_processes_at_batch_b_see_the_images_of_one_at_2b():
    """Rank r takes global positions r, r + 2, ...: at every step the two ranks' (image, seed) pairs are
    those of one process at twice the batch; resuming at a step gives the tail of the same list."""
    one = epoch_items(20, 3, 1, 0, 1, 2, 8)
    ranks = [epoch_items(20, 3, 1, r, 2, 2, 4) for r in range(2)]
    for step in range(2):
        assert sorted(one[step * 8:(step + 1) * 8]) == sorted(ranks[0][step * 4:(step + 1) * 4] +
                                                              ranks[1][step * 4:(step + 1) * 4])
    assert epoch_items(20, 3, 1, 0, 1, 2, 8, start_step=1) == one[8:]
    assert len({i for i, _ in one}) == 16 and one != epoch_items(20, 3, 2, 0, 1, 2, 8)  # a new order each epoch


BAD = [('epochs', -1, '--finetune_epochs -1'), ('lr', 0.0, '--finetune_lr 0.0'), ('lr', -1e-3, '--finetune_lr -0.001'),
       ('lr', float('nan'), '--finetune_lr nan'), ('batch_size', 0, '--finetune_batch_size 0'),
       ('loss', 'kl', "--finetune_loss 'kl'")]


@pytest.mark.parametrize('field, value, flag', BAD)
def test_bad_config_is_one_line_and_writes_nothing(field, value, flag, tmp_path):
    config = FinetuneConfig(**{field: value})
    with pytest.raises(UserError) as err:
        finetune(_model('vit'), Images(), config, str(tmp_path / 'ck.pt'), 'cpu', teacher=None, progress=False)
    assert str(err.value).startswith(flag) and '\n' not in str(err.value)
    assert os.listdir(tmp_path) == []


def test_a_model_without_qwt_and_distillation_without_teacher_are_one_line(tmp_path):
    plain = make_tiny_vit()
    with pytest.raises(UserError, match='has none: fine-tune after the QwT fit'):
        trainable_parameters(plain)
    with pytest.raises(UserError, match='distill needs the full-precision model as teacher'):
        finetune(_model('vit'), Images(), FinetuneConfig(workers=0), str(tmp_path / 'ck.pt'), 'cpu', progress=False)
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path):
    path = str(tmp_path / 'ck.pt')
    config = FinetuneConfig(epochs=1, batch_size=4, max_images=4, loss='label', workers=0)
    finetune(_model('vit'), Images(), config, path, 'cpu', progress=False)
    with pytest.raises(UserError, match=r'written with lr=0\.0001, this run has lr=0\.001: rerun with the same flags'):
        finetune(_model('vit'), Images(), dataclasses.replace(config, lr=1e-3), path, 'cpu', progress=False)


class RandomlyAugmented(Images):
    """Images plus a transform that draws from torch's and python's generators."""

    def __getitem__(self, i):
        import random
        x = self.x[i] + 0.1 * torch.randn(self.x[i].shape)
        return (x.flip(-1) if random.random() < 0.5 else x), self.y[i]


def _generator_states():
    import random
    return random.getstate(), repr(np.random.get_state()), torch.get_rng_state().tolist()


def test_workers_do_not_change_the_run_and_a_finished_run_resumes_at_its_end(tmp_path, caplog):
    """Each image is augmented under its own seed: 2 loader workers give the run of 0, bit for bit (here with
    the label loss, mixup on the CPU and smoothing), and the process's generators are left as they were.
    Progress lines name step, loss, lr and images/s; a rerun on the final checkpoint logs where it resumes
    and changes nothing."""
    import logging
    config = FinetuneConfig(epochs=1, batch_size=4, loss='label', mixup=0.5, smoothing=0.1, lr=1e-2, workers=0)
    states = []
    for workers in (0, 2):
        model = _model('vit')
        generators = _generator_states()
        with caplog.at_level(logging.INFO, logger='quant.finetune'):
            finetune(model, RandomlyAugmented(), dataclasses.replace(config, workers=workers),
                     str(tmp_path / f'w{workers}.pt'), 'cpu', progress=False)
        # nothing drawn from the process's generators: a resumed run needs no generator states
        assert _generator_states() == generators
        states.append({k: v.clone() for k, v in trainable_parameters(model).items()})
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    # cosine over 2 steps from 1e-2 to 1e-6, by hand: step 1 at t = 0 has 1e-2, step 2 at t = 1 (1e-2 + 1e-6) / 2
    assert re.search(r'QwT\* step 1/2: loss \d+\.\d{4}, lr 0\.01, \d+\.\d images/s', caplog.text)
    assert re.search(r'QwT\* step 2/2: loss \d+\.\d{4}, lr 0\.005, \d+\.\d images/s', caplog.text)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='quant.finetune'):
        result = finetune(model, RandomlyAugmented(), config, str(tmp_path / 'w2.pt'), 'cpu', progress=False)
    assert f"resuming QwT* from step 2 of 2 ({tmp_path / 'w2.pt'})" in caplog.text and result.resumed_from == 2
    for name, p in trainable_parameters(model).items():
        assert torch.equal(p, states[1][name])


def test_an_unreadable_checkpoint_is_one_line_and_kept(tmp_path):
    path = tmp_path / 'ck.pt'
    path.write_bytes(b'not a checkpoint')
    config = FinetuneConfig(epochs=1, batch_size=4, max_images=4, loss='label', workers=0)
    with pytest.raises(UserError, match=r'^cannot read the QwT\* checkpoint .*: delete it to start the fine-tuning over$'):
        finetune(_model('vit'), Images(), config, str(path), 'cpu', progress=False)
    assert path.read_bytes() == b'not a checkpoint'
