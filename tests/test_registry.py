"""The model table (models/registry.py) against SPEC §1 as literal numbers, and against timm 0.4.12's
own default_cfg wherever SPEC §1 does not override it."""
import pytest
import timm
from timm.models.registry import _model_default_cfgs

from models.registry import MODELS, ModelSpec, resolve_model
from utils.core.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# SPEC §1, copied by hand: --model -> (timm name, family, mean, std, crop_pct)
SPEC_TABLE = {
    'vit_small': ('vit_small_patch16_224', 'vit', HALF, HALF, 0.9),
    'vit_base': ('vit_base_patch16_224', 'vit', HALF, HALF, 0.9),
    'deit_tiny': ('deit_tiny_patch16_224', 'vit', IMAGENET_MEAN, IMAGENET_STD, 0.875),
    'deit_small': ('deit_small_patch16_224', 'vit', IMAGENET_MEAN, IMAGENET_STD, 0.875),
    'deit_base': ('deit_base_patch16_224', 'vit', IMAGENET_MEAN, IMAGENET_STD, 0.875),
    'deit_tiny_distilled': ('deit_tiny_distilled_patch16_224', 'vit', IMAGENET_MEAN, IMAGENET_STD, 0.875),
    'deit_small_distilled': ('deit_small_distilled_patch16_224', 'vit', IMAGENET_MEAN, IMAGENET_STD, 0.875),
    'deit_base_distilled': ('deit_base_distilled_patch16_224', 'vit', IMAGENET_MEAN, IMAGENET_STD, 0.875),
    'swin_tiny': ('swin_tiny_patch4_window7_224', 'swin', IMAGENET_MEAN, IMAGENET_STD, 0.9),
    'swin_small': ('swin_small_patch4_window7_224', 'swin', IMAGENET_MEAN, IMAGENET_STD, 0.9),
    # SPEC §3b
    'resnet18': ('resnet18', 'resnet', IMAGENET_MEAN, IMAGENET_STD, 0.875),
    'resnet50': ('resnet50', 'resnet', IMAGENET_MEAN, IMAGENET_STD, 0.875),
    'resnet101': ('resnet101', 'resnet', IMAGENET_MEAN, IMAGENET_STD, 0.875),
}
# What SPEC §1 sets against timm's default_cfg: DeiT's crop (timm 0.4.12 says 0.9). Everything
# else must be timm's own value.
SPEC_OVERRIDES = {name: {'crop_pct'} for name in SPEC_TABLE if name.startswith('deit_')}
# and the published ResNet script's bicubic transforms (timm 0.4.12's resnet18 says bilinear)
SPEC_OVERRIDES['resnet18'] = {'interpolation'}


@pytest.mark.parametrize('name', sorted(SPEC_TABLE))
def test_table_model_matches_spec_literals(name):
    timm_name, family, mean, std, crop_pct = SPEC_TABLE[name]
    spec = MODELS[name]
    assert spec == ModelSpec(name, timm_name, family, mean, std, crop_pct, 'bicubic')
    assert resolve_model(name) is spec and resolve_model(timm_name) is spec


def test_specs_are_immutable():
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS['deit_tiny'].crop_pct = 0.9


def test_table_holds_exactly_the_spec_models():
    assert list(MODELS) == ['vit_small', 'vit_base', 'deit_tiny', 'deit_tiny_distilled', 'deit_small',
                            'deit_small_distilled', 'deit_base', 'deit_base_distilled', 'swin_tiny', 'swin_small',
                            'resnet18', 'resnet50', 'resnet101']


@pytest.mark.parametrize('name', sorted(SPEC_TABLE))
def test_table_model_matches_timm_default_cfg(name):
    spec = MODELS[name]
    cfg = _model_default_cfgs[spec.timm_name]
    for field in ('mean', 'std', 'crop_pct', 'interpolation'):
        if field not in SPEC_OVERRIDES.get(name, ()):
            assert getattr(spec, field) == pytest.approx(cfg[field], abs=0), (name, field)
    if name.startswith('deit_'):
        assert cfg['crop_pct'] == 0.9 and spec.crop_pct == 0.875  # the override is real
    if name == 'resnet18':
        assert cfg['interpolation'] == 'bilinear' and spec.interpolation == 'bicubic'


def test_timm_registry_is_what_create_model_reports():
    """The registry of default cfgs read above is the default_cfg a built model carries."""
    model = timm.create_model('deit_tiny_patch16_224', pretrained=False)
    registered = _model_default_cfgs['deit_tiny_patch16_224']
    assert {k: model.default_cfg[k] for k in registered} == registered
    assert timm.__version__ == '0.4.12'


@pytest.mark.parametrize('name,family,mean,std,crop_pct', [
    ('deit_base_patch16_384', 'vit', None, None, None),
    ('vit_large_patch16_224', 'vit', None, None, None),
    ('swin_base_patch4_window7_224', 'swin', None, None, None),
])
def test_other_timm_names_resolve(name, family, mean, std, crop_pct):
    """Outside the table every value is left to timm's default_cfg (None): a 384-pixel DeiT crops 1.0."""
    assert resolve_model(name) == ModelSpec(name, name, family, mean, std, crop_pct)


@pytest.mark.parametrize('name,message', [
    ('vit_base_resnet50_384', "model 'vit_base_resnet50_384' is not a ViT, DeiT or Swin transformer"),
    ('vit_base_r50_s16_384', "model 'vit_base_r50_s16_384' is not a ViT, DeiT or Swin transformer"),
    ('resnet34', "model 'resnet34' is not a ViT, DeiT or Swin transformer: RepQ-ViT + QwT here supports vit_*, "
                 "deit_* and swin_* models (Percentile + QwT supports resnet18, resnet50 and resnet101)"),
    ('deit_huge', "unknown model 'deit_huge': use one of vit_small, vit_base, deit_tiny"),
])
def test_unsupported_names_are_refused(name, message):
    with pytest.raises(UserError) as info:
        resolve_model(name)
    assert str(info.value).startswith(message)
