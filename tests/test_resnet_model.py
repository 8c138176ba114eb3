"""The ResNet pieces QwT needs (models/resnet.py): the stem, the block walk across stages, the registry rows
and the refusal of a silent download (SPEC §3b)."""
import pytest
import torch
from timm.models.resnet import BasicBlock, Bottleneck

import models
from conftest import make_tiny_resnet
from models.registry import resolve_model
from utils.core.errors import UserError


def _images(n=2, size=32, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_resnet_walk_is_every_residual_block_across_stages():
    torch.manual_seed(0)
    model = models.build_model('resnet18', pretrained=False)
    slots = models.walk(model)
    expected = [blk for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in stage]
    assert len(slots) == 8 and [s.kind for s in slots] == ['block'] * 8
    assert all(s.module is blk for s, blk in zip(slots, expected))
    assert all(isinstance(s.module, BasicBlock) for s in slots)
    slots[5].replace(torch.nn.Identity())  # index 5 is layer3[1]: indexed across stages
    assert isinstance(model.layer3[1], torch.nn.Identity)


@pytest.mark.parametrize('name,depths,block', [('resnet50', (3, 4, 6, 3), Bottleneck),
                                               ('resnet101', (3, 4, 23, 3), Bottleneck)])
def test_bottleneck_resnets_walk_33_and_16_blocks(name, depths, block):
    with torch.device('meta'):  # structure only: no memory, no draws of the global generator
        model = models.build_model(name, pretrained=False)
    slots = models.walk(model)
    assert len(slots) == sum(depths) and all(isinstance(s.module, block) for s in slots)
    assert [models.block_channels(s.module) for s in slots][:4] == [(64, 256), (256, 256), (256, 256), (256, 512)]
    assert models.block_channels(slots[-1].module) == (2048, 2048)


def test_stem_then_blocks_then_head_is_the_model(tiny_resnet):
    model = tiny_resnet
    x = _images()
    with torch.no_grad():
        h = models.stem(model, x)
        want = model.maxpool(torch.relu(model.bn1(model.conv1(x))))
        assert torch.equal(h, want) and h.shape == (2, 64, 8, 8)
        for slot in models.walk(model):
            h = slot.module(h)
        assert torch.equal(model.fc(model.global_pool(h)), model(x))


def test_registry_rows_and_family():
    for name in ('resnet18', 'resnet50', 'resnet101'):
        spec = resolve_model(name, 'resnet')
        assert (spec.timm_name, spec.family, spec.crop_pct, spec.interpolation) == (name, 'resnet', 0.875, 'bicubic')
        assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    with pytest.raises(UserError, match=r"^unknown model 'resnet34': Percentile \+ QwT supports resnet18, resnet50 "
                                        r"and resnet101$"):
        resolve_model('resnet34', 'resnet')


def test_build_model_never_downloads_resnet_weights():
    with pytest.raises(UserError, match="^resnet50: timm's pretrained weights are another training than the "
                                        "published ones and are never downloaded here: pass the published weights "
                                        r"file as checkpoint \(--checkpoint\)$"):
        models.build_model('resnet50')


def test_randomize_batchnorms_leaves_the_global_generator_alone():
    model = make_tiny_resnet()
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    models.randomize_batchnorms(model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(float(m.weight.detach().min()) >= 0.5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_a_checkpoint_without_batchnorm_step_counters_loads(tmp_path):
    """Older ResNet files (saved before torch 0.4.1, like torchvision's first releases) have no
    ``num_batches_tracked``; torch's BatchNorm fills it in, so the fit check must not call it missing. Any
    other missing key still is."""
    from models.build import load_weights, state_dict_mismatches
    source = make_tiny_resnet(seed=1)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert len(state) < len(source.state_dict())
    torch.save(state, tmp_path / 'old.pth')
    model = load_weights(make_tiny_resnet(seed=2), str(tmp_path / 'old.pth'))
    assert torch.equal(model.conv1.weight, source.conv1.weight) and torch.equal(model.bn1.running_var, source.bn1.running_var)
    del state['bn1.running_mean']
    assert state_dict_mismatches(source.state_dict(), state) == ['missing keys bn1.running_mean']
