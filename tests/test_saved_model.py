"""--save / --load: the rebuilt model gives the same logits bit for bit, and bad files are clear errors."""
import os

import pytest
import torch

from conftest import make_tiny_swin, make_tiny_vit, save_random_checkpoint
from quant import qwt_compensate, repq_vit
from quant.layers import quantizers
from quant.saved_model import FORMAT, VERSION, load_quantized, read_saved, save_quantized
from utils import pipeline
from utils.errors import UserError


def quantized(make, seed=0):
    torch.manual_seed(seed)
    model = make()
    repq_vit(model, torch.randn(8, 3, 32, 32), 4, 4)
    qwt_compensate(model, torch.randn(16, 3, 32, 32), batch_size=8)
    return model


@pytest.mark.parametrize('make', [make_tiny_vit, make_tiny_swin], ids=['vit', 'swin'])
def test_save_load_gives_identical_logits(make, tmp_path):
    model = quantized(make)
    path = str(tmp_path / 'q.pth')
    save_quantized(model, path, 'tiny', 'tiny_timm', 4, 4, meta={'seed': 3})
    assert os.listdir(tmp_path) == ['q.pth']
    loaded, payload = load_quantized(path, model=make(seed=7))  # other random weights: all must be overwritten
    assert (payload['model'], payload['w_bits'], payload['a_bits'], payload['meta']) == ('tiny', 4, 4, {'seed': 3})
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    for (name, q), (name2, q2) in zip(quantizers(model), quantizers(loaded)):
        assert name == name2 and q2.inited and torch.equal(q.delta, q2.delta)


def test_reparameterised_bias_is_restored(tmp_path):
    """Swin's PatchMerging.reduction has no bias in timm; the reparameterisation adds one."""
    model = quantized(make_tiny_swin)
    assert model.layers[0].downsample.reduction.bias is not None
    save_quantized(model, str(tmp_path / 'q.pth'), 'tiny', 'tiny_timm', 4, 4)
    loaded, _ = load_quantized(str(tmp_path / 'q.pth'), model=make_tiny_swin())
    assert torch.equal(loaded.layers[0].downsample.reduction.bias, model.layers[0].downsample.reduction.bias)


def test_uncalibrated_model_is_refused(tmp_path):
    from quant.wrap import quantize_model
    model = quantize_model(make_tiny_vit(), 4, 4)
    with pytest.raises(ValueError, match='uncalibrated quantizers'):
        save_quantized(model, str(tmp_path / 'q.pth'), 'tiny', 'tiny', 4, 4)
    assert not os.path.exists(tmp_path / 'q.pth')


def test_plain_weights_are_not_a_saved_model(tmp_path):
    path = save_random_checkpoint('deit_tiny_patch16_224', str(tmp_path / 'w.pth'))
    with pytest.raises(UserError, match=r'is not a quantized model written by --save \(plain weights go to --checkpoint\)'):
        read_saved(path)
    (tmp_path / 'junk.pth').write_bytes(b'junk')
    with pytest.raises(UserError, match=r'cannot read --load .*junk.pth .*pass a file written by --save'):
        read_saved(str(tmp_path / 'junk.pth'))


def test_saved_model_given_as_checkpoint_points_to_load(tmp_path):
    from models import build_model
    path = str(tmp_path / 'q.pth')
    save_quantized(quantized(make_tiny_vit), path, 'tiny', 'tiny', 4, 4)
    with pytest.raises(UserError, match='is a quantized model written by --save: evaluate it with --load'):
        build_model('deit_tiny', checkpoint=path)


def fake_saved(path, timm_name='deit_tiny_patch16_224', w_bits=4, a_bits=4, version=VERSION):
    torch.save({'format': FORMAT, 'version': version, 'model': 'x', 'timm_name': timm_name, 'w_bits': w_bits,
                'a_bits': a_bits, 'compensated': True, 'state_dict': {}, 'quantizers': {}, 'meta': {}}, path)
    return path


@pytest.mark.parametrize('family,saved,flags,message', [
    ('vit', {'timm_name': 'swin_tiny_patch4_window7_224'}, [],
     'holds swin_tiny_patch4_window7_224, a swin model: run it with qwt_swin.py'),
    ('vit', {}, ['--w_bits', '6'], '--w_bits 6 does not match --load'),
    ('vit', {'a_bits': 6}, ['--a_bit', '4'], 'quantized with a_bits 6: leave --a_bits out'),
    ('vit', {}, ['--model', 'deit_small'], '--model deit_small does not match --load'),
    ('vit', {'version': 99}, [], 'has format version 99; this code reads version 1'),
])
def test_load_conflicts(capsys, tmp_path, family, saved, flags, message):
    from utils.demo import make_image_folder
    path = fake_saved(str(tmp_path / 's.pth'), **saved)
    root = make_image_folder(str(tmp_path / 'd'))
    with pytest.raises(SystemExit) as exc:
        pipeline.main(family, ['--load', path, '--data_dir', root, '--allow_class_subset', '--output_dir', str(tmp_path / 'o'), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_file_for_another_architecture_names_mismatches(tmp_path):
    path = str(tmp_path / 'q.pth')
    save_quantized(quantized(make_tiny_vit), path, 'tiny', 'tiny', 4, 4)
    with pytest.raises(UserError, match=r"--load .*q.pth does not fit tiny: missing keys patch_embed.norm.weight, .*unexpected keys cls_token"):
        load_quantized(path, model=make_tiny_swin())
