"""The GPU path: the quantizer search, a tiny end-to-end run, the fp16 compensation and the quantizer
state moving with ``.to()``. Marked ``cuda`` and skipped without a GPU; run them alone with

    python -m pytest -q -m cuda tests

Each test also runs on the CPU in the ordinary suite, so the checks themselves are exercised
everywhere (the CPU variants are cheap)."""
import copy

import pytest
import torch

import quant.quantizers as qz
from conftest import make_tiny_swin, make_tiny_vit, torch_flags
from quant import qwt_compensate, repq_vit
from quant.layers import quantizers
from quant.qwt import CompensatedBlock, compensated_blocks

DEVICES = [pytest.param('cuda', marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason='needs a CUDA GPU')]),
           'cpu']


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 on the GPU (cuDNN convolutions default to TF32), so that CPU and GPU runs differ
    by summation order only."""
    with torch_flags((torch.backends.cudnn, 'allow_tf32', False), (torch.backends.cuda.matmul, 'allow_tf32', False)):
        yield


@pytest.mark.parametrize('device', DEVICES)
def test_quantizer_search_on_device(device):
    """The fast search reproduces the published one on the device bit for bit (the self-check
    passes there, so the fast path is the one used), and the CPU's parameters to float tolerance."""
    assert qz.quantiles_match_torch(torch.device(device)) is True
    g = torch.Generator().manual_seed(0)
    acts = (torch.randn(4, 50, 16, generator=g) ** 3 * torch.linspace(0.1, 3, 16)).to(device)
    weight = torch.randn(24, 16, generator=g).to(device)
    attn = torch.softmax(torch.randn(2, 3, 40, 40, generator=g) * 3, dim=-1).to(device)
    for x in (acts, weight):
        fast = qz.search_uniform_channelwise(x, 4)
        published = qz.search_uniform_channelwise(x, 4, per_channel_loop=True)
        assert all(t.device.type == device for t in fast)
        assert torch.equal(fast[0], published[0]) and torch.equal(fast[1], published[1])
        cpu = qz.search_uniform_channelwise(x.cpu(), 4)
        torch.testing.assert_close(fast[0].cpu(), cpu[0], rtol=1e-5, atol=0)
    assert torch.equal(qz.search_uniform(acts, 4)[0], qz.search_uniform(acts, 4, fast=False)[0])
    assert torch.equal(qz.search_log_sqrt2(attn, 4), qz.search_log_sqrt2(attn, 4, fast=False))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('make', [make_tiny_vit, make_tiny_swin], ids=['vit', 'swin'])
def test_tiny_end_to_end_on_device(device, make):
    """RepQ-ViT + QwT on the device: every quantizer's state and every W, b live there, and the
    logits agree with the same run on the CPU to float tolerance."""
    g = torch.Generator().manual_seed(1)
    calib, images, x = (torch.randn(n, 3, 32, 32, generator=g) for n in (8, 16, 4))
    runs = {}
    for dev in dict.fromkeys((device, 'cpu')):
        model = make().to(dev)
        repq_vit(model, calib.to(dev), 4, 4)
        qwt_compensate(model, images.to(dev), batch_size=8, solver='lstsq')
        with torch.no_grad():
            runs[dev] = (model, model(x.to(dev)))
    model, logits = runs[device]
    assert all(b.device.type == device for b in model.buffers())
    assert all(c.comp_weight.device.type == device for c in compensated_blocks(model))
    assert torch.isfinite(logits).all()
    cpu_model, cpu_logits = runs['cpu']
    for (name, q), (_, q_cpu) in zip(quantizers(model), quantizers(cpu_model)):
        torch.testing.assert_close(q.delta.cpu(), q_cpu.delta, rtol=1e-2, atol=0, msg=name)
    torch.testing.assert_close(logits.cpu(), cpu_logits, rtol=0, atol=0.05 * float(cpu_logits.abs().max()))


@pytest.mark.parametrize('device', DEVICES)
def test_fp16_compensation_on_device(device):
    """Hand values (see test_qwt): the operands are rounded to half precision before the product."""
    x = torch.tensor([[[1 + 2 ** -12, 0.5]]], device=device)
    comp = CompensatedBlock(torch.nn.Identity().eval(), torch.tensor([[3.0, 0.0], [0.0, 1 + 2 ** -12]]),
                            torch.tensor([0.25, -1.0])).to(device)
    with torch.no_grad():
        assert comp(x).tolist() == [[[1 + 2 ** -12 + 3 + 0.25, 0.0]]]
        assert comp.forward_fp32(x).tolist() == [[[1 + 2 ** -12 + 3 + 3 * 2 ** -12 + 0.25, 2 ** -13]]]


@pytest.mark.parametrize('device', DEVICES)
def test_calibrated_model_moves_with_to(device):
    """A model calibrated on the CPU, moved with ``.to()``: its quantizer state goes along (the
    flags stay Python bools) and the logits match the CPU's to float tolerance."""
    torch.manual_seed(0)
    model = make_tiny_vit()
    repq_vit(model, torch.randn(8, 3, 32, 32), 4, 4)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        moved = copy.deepcopy(model).to(device)
        assert all(q.delta.device.type == device and q.inited is True for _, q in quantizers(moved))
        out = moved(x.to(device))
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-2 * float(ref.abs().max()))
