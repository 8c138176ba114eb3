"""Model size of SPEC §4: Σ numel × bits / 8 / 1e6."""
import pytest
import torch

from models import prepare_model
from quant.qwt import CompensatedBlock
from quant.size import model_size_mb
from quant.wrap import quantize_model


def _vit(depth=2):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return prepare_model(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3,
                                           num_classes=10))


# Tiny ViT: embed 48, 3x8x8 patches of a 32x32 image -> 16 patches + cls = 17 tokens, MLP 192, 10 classes.
PATCH_W = 48 * 3 * 8 * 8            # 9216, 8 bits
HEAD_W = 10 * 48                    # 480, 8 bits
BLOCK_W = 144 * 48 + 48 * 48 + 192 * 48 + 48 * 192   # qkv, proj, fc1, fc2 weights: 27648, w bits
BLOCK_FLOAT = 2 * 48 + 144 + 48 + 2 * 48 + 192 + 48  # norm1, qkv bias, proj bias, norm2, fc1 bias, fc2 bias: 624
OTHER_FLOAT = 48 + 48 + 17 * 48 + 2 * 48 + 10        # patch bias, cls_token, pos_embed, final norm, head bias: 1018


def _hand_bits(depth, w_bits):
    return (PATCH_W + HEAD_W) * 8 + depth * BLOCK_W * w_bits + (depth * BLOCK_FLOAT + OTHER_FLOAT) * 32


def test_hand_count_matches_model():
    model = _vit()
    n = sum(p.numel() for p in model.parameters())
    assert n == PATCH_W + HEAD_W + 2 * (BLOCK_W + BLOCK_FLOAT) + OTHER_FLOAT


def test_float_model_counts_32_bits():
    model = _vit()
    assert model_size_mb(model) == pytest.approx(sum(p.numel() for p in model.parameters()) * 4 / 1e6, abs=1e-12)


@pytest.mark.parametrize('w_bits', [4, 6])
def test_quantized_vit_size_hand_computed(w_bits):
    model = quantize_model(_vit(), w_bits=w_bits, a_bits=8 if w_bits == 4 else 4)
    expected = _hand_bits(2, w_bits) / 8 / 1e6
    if w_bits == 4:
        assert expected == pytest.approx(0.046408, abs=1e-12)  # (77568 + 221184 + 72512) / 8 / 1e6
    assert model_size_mb(model) == pytest.approx(expected, abs=1e-12)
    assert model_size_mb(model, include_compensation=False) == pytest.approx(expected, abs=1e-12)


def test_size_with_compensated_block():
    model = quantize_model(_vit(), w_bits=4, a_bits=4)
    base = _hand_bits(2, 4)
    model.blocks[0] = CompensatedBlock(model.blocks[0], torch.zeros(48, 48), torch.zeros(48))
    model.blocks[1] = CompensatedBlock(model.blocks[1], torch.randn(48, 48), torch.randn(48))
    comp = 2 * (48 * 48 * 16 + 48 * 32)  # W at 16 bits, b at 32 bits, per block: 38400 bits
    assert model_size_mb(model) == pytest.approx((base + comp) / 8 / 1e6, abs=1e-12)
    assert model_size_mb(model) == pytest.approx(0.046408 + 2 * 0.0048, abs=1e-12)
    assert model_size_mb(model, include_compensation=True) == pytest.approx((base + comp) / 8 / 1e6, abs=1e-12)
    assert model_size_mb(model, include_compensation=False) == pytest.approx(base / 8 / 1e6, abs=1e-12)


def test_swin_size_counts_reduction_and_created_bias(tiny_swin):
    model = quantize_model(tiny_swin, w_bits=4, a_bits=4)
    quant_leaves = ('qkv', 'proj', 'fc1', 'fc2', 'reduction')

    def bits_of(name):
        module, leaf = name.rsplit('.', 1)
        if leaf == 'weight' and module.rsplit('.', 1)[-1] in quant_leaves and module != 'patch_embed.proj':
            return 4
        if name in ('patch_embed.proj.weight', 'head.weight'):
            return 8
        return 32
    expected = sum(p.numel() * bits_of(n) for n, p in model.named_parameters()) / 8 / 1e6
    red = model.layers[0].downsample.reduction
    assert red.bias is None
    assert model_size_mb(model) == pytest.approx(expected, abs=1e-12)
    # a bias created by the reparameterisation counts 32 bits
    red.bias = torch.nn.Parameter(torch.zeros(red.out_features))
    assert model_size_mb(model) == pytest.approx(expected + red.out_features * 4 / 1e6, abs=1e-12)
