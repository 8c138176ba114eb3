"""Model preparation and the block walk QwT follows (models/__init__.py, walk.py, vit.py, swin.py)."""
import copy

import pytest
import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention as TimmWindowAttention
from timm.models.vision_transformer import Attention as TimmAttention, Block

import models
from conftest import make_tiny_swin, make_tiny_vit
from models.attention import Attention, MatMul, WindowAttention


def _images(n=3, seed=7):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_vit_walk_yields_blocks_in_order(tiny_vit):
    slots = models.walk(tiny_vit)
    assert len(slots) == 3
    assert [s.kind for s in slots] == ['block'] * 3
    assert [s.key for s in slots] == [0, 1, 2]
    assert all(a.module is b for a, b in zip(slots, tiny_vit.blocks))
    assert all(isinstance(s.module, Block) for s in slots)


def test_swin_walk_yields_blocks_then_merge_per_stage(tiny_swin):
    expected = []
    for layer in tiny_swin.layers:
        expected += [(blk, 'block') for blk in layer.blocks]
        if layer.downsample is not None:
            expected.append((layer.downsample, 'merge'))
    slots = models.walk(tiny_swin)
    assert [s.kind for s in slots] == ['block', 'block', 'merge', 'block', 'block']
    assert len(slots) == len(expected)
    for slot, (module, kind) in zip(slots, expected):
        assert slot.module is module
        assert slot.kind == kind
    assert isinstance(slots[2].module, PatchMerging)
    assert all(isinstance(s.module, SwinTransformerBlock) for s in slots if s.kind == 'block')


def test_slot_replace_index_and_attribute(tiny_vit, tiny_swin):
    slot = models.walk(tiny_vit)[1]
    new = torch.nn.Identity()
    slot.replace(new)
    assert tiny_vit.blocks[1] is new and slot.module is new
    assert models.walk(tiny_vit)[1].module is new

    merge = [s for s in models.walk(tiny_swin) if s.kind == 'merge'][0]
    new_merge = torch.nn.Identity()
    merge.replace(new_merge)
    assert tiny_swin.layers[0].downsample is new_merge and merge.module is new_merge
    block = models.walk(tiny_swin)[3]  # stage 1, block 0
    new_block = torch.nn.Identity()
    block.replace(new_block)
    assert tiny_swin.layers[1].blocks[0] is new_block


@pytest.mark.parametrize('distilled', [False, True])
def test_vit_stem_walk_norm_equals_forward_features(distilled):
    model = make_tiny_vit(seed=3, distilled=distilled)
    x = _images()
    with torch.no_grad():
        h = models.stem(model, x)
        assert h.shape == (3, 16 + 1 + int(distilled), 48)
        for slot in models.walk(model):
            h = slot.module(h)
        h = model.norm(h)
        want = model.forward_features(x)
        if distilled:
            assert torch.equal(h[:, 0], want[0]) and torch.equal(h[:, 1], want[1])
            logits = (model.head(h[:, 0]) + model.head_dist(h[:, 1])) / 2
        else:
            assert torch.equal(model.pre_logits(h[:, 0]), want)
            logits = model.head(model.pre_logits(h[:, 0]))
        assert torch.equal(logits, model(x))


def test_swin_stem_walk_head_equals_model():
    model = make_tiny_swin(seed=3)
    x = _images()
    with torch.no_grad():
        h = models.stem(model, x)
        assert h.shape == (3, 16 * 16, 24)
        for slot in models.walk(model):
            h = slot.module(h)
        assert h.shape == (3, 8 * 8, 48)
        h = model.norm(h)
        h = torch.flatten(model.avgpool(h.transpose(1, 2)), 1)
        assert torch.equal(model.head(h), model(x))


def test_swin_stem_adds_absolute_pos_embed():
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    model = models.prepare_model(SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=(2, 2),
                                                 num_heads=(2, 4), window_size=4, num_classes=10, ape=True,
                                                 drop_path_rate=0.0))
    with torch.no_grad():
        model.absolute_pos_embed.normal_()
        x = _images()
        h = models.stem(model, x)
        torch.testing.assert_close(h, model.patch_embed(x) + model.absolute_pos_embed)
        for slot in models.walk(model):
            h = slot.module(h)
        h = torch.flatten(model.avgpool(model.norm(h).transpose(1, 2)), 1)
        assert torch.equal(model.head(h), model(x))


def _prepared_pair(kind, seed=11):
    if kind == 'swin':
        timm_model = make_tiny_swin(seed=seed, prepare=False)
    else:
        timm_model = make_tiny_vit(seed=seed, distilled=kind == 'deit', prepare=False)
    prepared = models.prepare_model(copy.deepcopy(timm_model))
    return timm_model, prepared


@pytest.mark.parametrize('kind', ['vit', 'deit', 'swin'])
def test_prepare_model_keeps_outputs_and_weights(kind):
    timm_model, prepared = _prepared_pair(kind)
    timm_model.train()
    prepared.train()
    models.prepare_model(prepared)
    assert not prepared.training and all(not m.training for m in prepared.modules())
    timm_model.eval()
    x = _images(4)
    with torch.no_grad():
        want, got = timm_model(x), prepared(x)
    assert got.shape == (4, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, torch.zeros_like(got))
    sd_t, sd_p = timm_model.state_dict(), prepared.state_dict()
    assert list(sd_t) == list(sd_p)
    assert all(torch.equal(sd_t[k], sd_p[k]) for k in sd_t)


def test_prepared_distilled_deit_returns_mean_of_heads():
    _, model = _prepared_pair('deit')
    x = _images(4)
    with torch.no_grad():
        cls, dist = model.forward_features(x)
        want = (model.head(cls) + model.head_dist(dist)) / 2
        got = model(x)
    assert torch.equal(got, want)
    assert not torch.allclose(model.head(cls), model.head_dist(dist))


@pytest.mark.parametrize('kind', ['vit', 'deit', 'swin'])
def test_prepared_attention_has_matmul_modules(kind):
    _, model = _prepared_pair(kind)
    attn_cls, timm_cls, n_blocks = (WindowAttention, TimmWindowAttention, 4) if kind == 'swin' else (Attention, TimmAttention, 3)
    attns = [m for m in model.modules() if isinstance(m, attn_cls)]
    assert len(attns) == n_blocks
    assert not any(type(m) is timm_cls for m in model.modules())
    calls = {'matmul1': 0, 'matmul2': 0}
    for a in attns:
        assert isinstance(a.matmul1, MatMul) and isinstance(a.matmul2, MatMul)
        assert a.matmul1 is not a.matmul2
        assert dict(a.named_children())['matmul1'] is a.matmul1
        for name in calls:
            getattr(a, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    with torch.no_grad():
        model(_images(2))
    assert calls == {'matmul1': n_blocks, 'matmul2': n_blocks}  # both products really run through them


def test_walk_rejects_other_models():
    with pytest.raises(TypeError, match='Sequential'):
        models.walk(torch.nn.Sequential(torch.nn.Linear(2, 2)))
