"""Which layer gets which quantizer (SPEC §2 table), after quant.wrap.quantize_model."""
import copy

import pytest
import torch
from torch import nn

from models import prepare_model
from models.attention import MatMul
from quant.layers import QuantConv2d, QuantLinear, QuantMatMul, set_quant_state
from quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from quant.wrap import quantize_model

W_BITS, A_BITS = 4, 6


def _is_uniform(q, bits, channel_wise):
    return type(q) is UniformQuantizer and q.n_bits == bits and q.channel_wise is channel_wise and not q.inited


def _check_linear(m, w_bits, a_bits, input_channel_wise, name):
    assert type(m) is QuantLinear, name
    assert _is_uniform(m.weight_quantizer, w_bits, True), (name, m.weight_quantizer)
    assert _is_uniform(m.input_quantizer, a_bits, input_channel_wise), (name, m.input_quantizer)
    assert not m.use_weight_quant and not m.use_input_quant, name


def _check_model(model, expected_counts):
    layernorms = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    params = {n: p for n, p in model.named_parameters()}
    quantize_model(model, w_bits=W_BITS, a_bits=A_BITS)
    counts = {'conv': 0, 'qkv': 0, 'fc1': 0, 'reduction': 0, 'proj': 0, 'fc2': 0, 'head': 0, 'head_dist': 0,
              'matmul1': 0, 'matmul2': 0}
    for name, m in model.named_modules():
        leaf = name.rsplit('.', 1)[-1]
        if isinstance(m, nn.Conv2d):
            assert name == 'patch_embed.proj' and type(m) is QuantConv2d
            assert _is_uniform(m.weight_quantizer, 8, True) and _is_uniform(m.input_quantizer, 8, False)
            counts['conv'] += 1
        elif isinstance(m, nn.Linear):
            if leaf in ('qkv', 'fc1', 'reduction'):
                _check_linear(m, W_BITS, A_BITS, True, name)
            elif leaf in ('proj', 'fc2'):
                _check_linear(m, W_BITS, A_BITS, False, name)
            elif leaf in ('head', 'head_dist'):
                _check_linear(m, 8, 8, False, name)
            else:
                pytest.fail(f'unexpected linear {name}')
            counts[leaf] += 1
        elif isinstance(m, MatMul):
            assert type(m) is QuantMatMul and leaf in ('matmul1', 'matmul2'), name
            if leaf == 'matmul1':
                assert _is_uniform(m.quantizer_A, A_BITS, False)
            else:
                assert type(m.quantizer_A) is LogSqrt2Quantizer and m.quantizer_A.n_bits == A_BITS
                assert not m.quantizer_A.inited
            assert _is_uniform(m.quantizer_B, A_BITS, False)
            assert not m.use_input_quant
            counts[leaf] += 1
    assert counts == expected_counts
    # LayerNorms untouched: same objects, still plain LayerNorm, not wrapped
    after = {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert after.keys() == layernorms.keys()
    assert all(after[n] is layernorms[n] and type(after[n]) is nn.LayerNorm for n in after)
    # every parameter is the very same tensor under the same name (state-dict keys as timm's)
    after_params = dict(model.named_parameters())
    assert after_params.keys() == params.keys()
    assert all(after_params[n] is params[n] for n in params)
    # every quantized layer holds quantizers, nothing else is quantized
    for m in model.modules():
        if isinstance(m, (UniformQuantizer, LogSqrt2Quantizer)):
            assert m.delta is None


def _counts(blocks, conv=1, reduction=0, head_dist=0):
    return {'conv': conv, 'qkv': blocks, 'fc1': blocks, 'reduction': reduction, 'proj': blocks, 'fc2': blocks,
            'head': 1, 'head_dist': head_dist, 'matmul1': blocks, 'matmul2': blocks}


def test_wrap_vit(tiny_vit):
    assert len(tiny_vit.blocks) >= 2
    _check_model(tiny_vit, _counts(len(tiny_vit.blocks)))
    assert tiny_vit.blocks[0].attn.qkv.input_quantizer.channel_wise
    assert tiny_vit.blocks[1].mlp.fc2.weight_quantizer.n_bits == W_BITS


def test_wrap_distilled_deit(tiny_deit_distilled):
    _check_model(tiny_deit_distilled, _counts(len(tiny_deit_distilled.blocks), head_dist=1))
    assert type(tiny_deit_distilled.head_dist) is QuantLinear
    assert tiny_deit_distilled.head_dist.input_quantizer.n_bits == 8


def test_wrap_swin(tiny_swin):
    n_blocks = sum(len(layer.blocks) for layer in tiny_swin.layers)
    n_merge = sum(layer.downsample is not None for layer in tiny_swin.layers)
    assert n_blocks >= 2 and n_merge >= 1
    _check_model(tiny_swin, _counts(n_blocks, reduction=n_merge))
    red = tiny_swin.layers[0].downsample.reduction
    assert type(red) is QuantLinear and red.bias is None
    assert red.input_quantizer.channel_wise and red.input_quantizer.n_bits == A_BITS


def test_wrap_bits_follow_arguments():
    """Swapping w and a bits swaps them in the quantized layers (no mix-up between them)."""
    from timm.models.vision_transformer import VisionTransformer
    model = prepare_model(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                                            num_classes=10))
    quantize_model(model, w_bits=6, a_bits=3)
    blk = model.blocks[0]
    assert blk.attn.qkv.weight_quantizer.n_bits == 6 and blk.attn.qkv.input_quantizer.n_bits == 3
    assert blk.mlp.fc2.weight_quantizer.n_bits == 6 and blk.mlp.fc2.input_quantizer.n_bits == 3
    assert blk.attn.matmul2.quantizer_A.n_bits == 3 and blk.attn.matmul2.quantizer_B.n_bits == 3
    assert model.head.weight_quantizer.n_bits == 8 and model.patch_embed.proj.input_quantizer.n_bits == 8


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10, **kw)


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2), num_heads=(2, 4),
                           window_size=4, num_classes=10)


@pytest.mark.parametrize('make', [_timm_vit, lambda: _timm_vit(distilled=True), _timm_swin],
                         ids=['vit', 'deit_distilled', 'swin'])
def test_prepared_model_keeps_timm_state_dict_and_function(make):
    timm_model = make().eval()
    with torch.no_grad():
        for m in timm_model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.1)
    prepared = prepare_model(copy.deepcopy(timm_model))
    timm_sd, prep_sd = timm_model.state_dict(), prepared.state_dict()
    assert list(prep_sd.keys()) == list(timm_sd.keys())
    assert all(torch.equal(prep_sd[k], timm_sd[k]) for k in timm_sd)
    assert sum(isinstance(m, MatMul) for m in prepared.modules()) == 2 * (4 if 'Swin' in type(prepared).__name__ else 2)
    assert not prepared.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = timm_model(x)
        out = prepared(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # after wrapping timm's keys are kept, in order; the only new entries are the uncalibrated
    # quantizers' state (delta and zero point come with calibration)
    quantize_model(prepared, W_BITS, A_BITS)
    keys = list(prepared.state_dict().keys())
    assert [k for k in keys if k in timm_sd] == list(timm_sd.keys())
    extra = [k for k in keys if k not in timm_sd]
    assert extra and all(k.rsplit('.', 1)[-1] in ('inited', 'channel_wise') for k in extra)
    assert all(k.rsplit('.', 2)[-2] in ('weight_quantizer', 'input_quantizer', 'quantizer_A', 'quantizer_B')
               for k in extra)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), ref, rtol=1e-5, atol=1e-6)
        set_quant_state(prepared, True, True)
        q = prepared(x)
    assert torch.isfinite(q).all() and not torch.allclose(q, ref, atol=1e-3)


def test_set_quant_state_switches_flags(tiny_vit):
    quantize_model(tiny_vit, W_BITS, A_BITS)
    layers = [m for m in tiny_vit.modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]
    assert len(layers) == 2 + 6 * len(tiny_vit.blocks)
    set_quant_state(tiny_vit, weight_quant=True, act_quant=False)
    assert all(m.use_weight_quant for m in layers if not isinstance(m, QuantMatMul))
    assert not any(m.use_input_quant for m in layers)
    set_quant_state(tiny_vit, weight_quant=False, act_quant=True)
    assert all(m.use_input_quant for m in layers)
    assert not any(getattr(m, 'use_weight_quant', False) for m in layers)


def test_unknown_linear_raises_value_error(tiny_vit):
    tiny_vit.blocks[1].mlp.extra = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"no quantization rule for linear layer 'blocks\.1\.mlp\.extra'"):
        quantize_model(tiny_vit, W_BITS, A_BITS)


def test_vit_with_pre_logits_linear_is_rejected():
    model = prepare_model(_timm_vit(representation_size=16))
    with pytest.raises(ValueError, match=r"'pre_logits\.fc'"):
        quantize_model(model, W_BITS, A_BITS)


def test_unknown_matmul_raises_value_error(tiny_vit):
    tiny_vit.blocks[0].attn.matmul3 = MatMul()
    with pytest.raises(ValueError, match='matmul3'):
        quantize_model(tiny_vit, W_BITS, A_BITS)


@pytest.mark.parametrize('which', ['tiny_vit', 'tiny_swin'])
def test_matmul_operands(which, request):
    """matmul1 gets (q, k^T) — q unscaled for ViT (scale after the product), pre-scaled for Swin —
    and matmul2 gets the post-softmax attention and v."""
    model = request.getfixturevalue(which)
    attn = next(m for m in model.modules() if hasattr(m, 'matmul1'))
    seen = {}
    attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__('qkv', o))
    attn.matmul1.register_forward_hook(lambda m, i, o: seen.__setitem__('mm1', i))
    attn.matmul2.register_forward_hook(lambda m, i, o: seen.__setitem__('mm2', i))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    B, N, C3 = seen['qkv'].shape
    h = attn.num_heads
    qkv = seen['qkv'].reshape(B, N, 3, h, C3 // 3 // h).permute(2, 0, 3, 1, 4)
    a, b = seen['mm1']
    scale = 1.0 if which == 'tiny_vit' else attn.scale
    torch.testing.assert_close(a, qkv[0] * scale)
    torch.testing.assert_close(b, qkv[1].transpose(-2, -1))
    p, v = seen['mm2']
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
    assert (p >= 0).all()
    torch.testing.assert_close(v, qkv[2])


def test_quantizer_state_is_put_on_the_model_device():
    """Wrapping a model that is already on a device (the pipeline moves it before calibration) puts
    the quantizers' buffers there too ('meta' stands in for a GPU here)."""
    model = prepare_model(_timm_vit()).to('meta')
    quantize_model(model, W_BITS, A_BITS)
    buffers = dict(model.named_buffers())
    assert 'blocks.0.attn.matmul2.quantizer_A.inited' in buffers
    assert {b.device.type for b in buffers.values()} == {'meta'}


def test_layer_plans_are_the_spec_table():
    """plan_layer for each row of the SPEC §2 table, as literal plans (w = 4, a = 6 here)."""
    import dataclasses
    from quant.wrap import LayerPlan, plan_layer
    lin, conv = nn.Linear(4, 4), nn.Conv2d(3, 4, 2)
    expected = {
        ('patch_embed.proj', conv): LayerPlan(8, 8, False, False),
        ('blocks.0.attn.qkv', lin): LayerPlan(4, 6, True, False),
        ('blocks.0.mlp.fc1', lin): LayerPlan(4, 6, True, False),
        ('layers.0.downsample.reduction', lin): LayerPlan(4, 6, True, False),
        ('blocks.0.attn.proj', lin): LayerPlan(4, 6, False, False),
        ('blocks.0.mlp.fc2', lin): LayerPlan(4, 6, False, False),
        ('head', lin): LayerPlan(8, 8, False, False),
        ('head_dist', lin): LayerPlan(8, 8, False, False),
        ('blocks.0.attn.matmul1', MatMul()): LayerPlan(None, 6, False, False),
        ('blocks.0.attn.matmul2', MatMul()): LayerPlan(None, 6, False, True),
        ('blocks.0.norm1', nn.LayerNorm(4)): None,
        ('blocks.0.mlp.act', nn.GELU()): None,
    }
    for (name, module), plan in expected.items():
        assert plan_layer(name, module, W_BITS, A_BITS) == plan, name
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan_layer('head', lin, W_BITS, A_BITS).input_bits = 4
