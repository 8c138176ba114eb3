"""--save / --load: the rebuilt model gives the same logits bit for bit, and bad files are clear errors."""
import copy
import functools
import os

import pytest
import torch

from conftest import make_tiny_swin, make_tiny_vit, save_random_checkpoint
from quant import qwt_compensate, repq_vit
from quant.layers import quantizers
from quant.saved_model import FORMAT, VERSION, load_quantized, read_saved, save_quantized
from utils.run import cli, pipeline
from utils.core.errors import UserError


@functools.lru_cache(maxsize=None)
def _quantized(make):
    torch.manual_seed(0)
    model = make()
    repq_vit(model, torch.randn(8, 3, 32, 32), 4, 4)
    qwt_compensate(model, torch.randn(16, 3, 32, 32), batch_size=8)
    return model


def quantized(make):
    """RepQ-ViT + QwT model, fitted once per session; each test gets its own copy."""
    return copy.deepcopy(_quantized(make))


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
    from quant.qwt import compensated_blocks
    assert not any(p.requires_grad for c in compensated_blocks(loaded) for p in (c.comp_weight, c.comp_bias))


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
    ('vit', {'version': 99}, [], 'has format version 99; this code reads versions 1 and 2: re-run --save'),
])
def test_load_conflicts(capsys, tmp_path, family, saved, flags, message):
    from utils.run.demo import make_image_folder
    path = fake_saved(str(tmp_path / 's.pth'), **saved)
    root = make_image_folder(str(tmp_path / 'd'))
    with pytest.raises(SystemExit) as exc:
        cli.main(family, ['--load', path, '--data_dir', root, '--allow_class_subset', '--output_dir', str(tmp_path / 'o'), *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_file_for_another_architecture_names_mismatches(tmp_path):
    path = str(tmp_path / 'q.pth')
    save_quantized(quantized(make_tiny_vit), path, 'tiny', 'tiny', 4, 4)
    with pytest.raises(UserError, match=r"--load .*q.pth does not fit tiny: missing keys patch_embed.norm.weight, .*unexpected keys cls_token"):
        load_quantized(path, model=make_tiny_swin())


# ---- quantizer state in the state dict -----------------------------------------------------------

def _state_keys(name, q):
    from quant.quantizers import UniformQuantizer
    return [f'{name}.{k}' for k in (('delta', 'zero_point', 'inited', 'channel_wise')
                                     if isinstance(q, UniformQuantizer) else ('delta', 'inited'))]


@pytest.mark.parametrize('make', [make_tiny_vit, make_tiny_swin], ids=['vit', 'swin'])
def test_state_dict_holds_every_quantizer_parameter(make):
    model = quantized(make)
    sd = model.state_dict()
    qs = quantizers(model)
    # per block: qkv, proj, fc1, fc2 (weight and input), matmul1, matmul2 (two operands); then the
    # patch embedding, the head and Swin's one PatchMerging reduction, two each
    per_block = 4 * 2 + 2 * 2
    assert len(qs) == (3 * per_block + 2 + 2 if make is make_tiny_vit else 4 * per_block + 2 + 2 + 2)
    for name, q in qs:
        for key in _state_keys(name, q):
            assert key in sd, key
        assert torch.equal(sd[f'{name}.delta'], q.delta) and sd[f'{name}.inited'].item() is True
        if f'{name}.zero_point' in sd:
            assert torch.equal(sd[f'{name}.zero_point'], q.zero_point)
            assert sd[f'{name}.channel_wise'].item() is q.channel_wise
    # the reparameterised inputs are layer-wise now, and the state dict says so
    qkv = 'blocks.0.block.attn.qkv.input_quantizer' if make is make_tiny_vit else \
        'layers.0.blocks.0.block.attn.qkv.input_quantizer'
    assert sd[f'{qkv}.channel_wise'].item() is False and sd[f'{qkv}.delta'].dim() == 0
    assert sd[qkv.replace('input', 'weight') + '.delta'].shape == (sd[qkv.replace('input_quantizer', 'weight')].shape[0], 1)


def _fresh_like(model, make, seed=5):
    """The same architecture, quantized and compensated but not calibrated, with other weights."""
    import models
    from quant.qwt import CompensatedBlock
    from quant.wrap import quantize_model
    fresh = quantize_model(make(seed=seed), 4, 4)
    for slot in models.walk(fresh):
        if slot.kind == 'block':
            slot.replace(CompensatedBlock(slot.module, torch.zeros(1), torch.zeros(1)))
    # parameters whose shape the fit or the reparameterisation decides: W, b, Swin's new reduction bias
    ref = dict(model.named_parameters())
    for name, m in fresh.named_modules():
        for attr in ('comp_weight', 'comp_bias', 'bias'):
            key = f'{name}.{attr}'
            if key in ref and (attr != 'bias' or m.bias is None):
                setattr(m, attr, torch.nn.Parameter(torch.zeros_like(ref[key]), requires_grad=False))
    return fresh


def test_state_dict_loads_into_an_uncalibrated_model():
    """Per-channel shapes come from the file; the loaded model gives the same logits."""
    from quant.layers import set_quant_state
    model = quantized(make_tiny_swin)
    fresh = _fresh_like(model, make_tiny_swin)
    assert all(q.delta is None and not q.inited for _, q in quantizers(fresh))
    fresh.load_state_dict(model.state_dict())
    set_quant_state(fresh, True, True)
    for (name, q), (_, q2) in zip(quantizers(model), quantizers(fresh)):
        assert q2.inited and q2.delta.shape == q.delta.shape and torch.equal(q2.delta, q.delta), name
        if hasattr(q, 'zero_point'):
            assert torch.equal(q2.zero_point, q.zero_point) and q2.channel_wise is q.channel_wise
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_dtype_round_trip_keeps_logits_and_top1():
    """``.to()`` moves the quantizer state with the model: float64 and back changes nothing."""
    model = quantized(make_tiny_vit)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        model.to(torch.float64)
        assert all(q.delta.dtype == torch.float64 for _, q in quantizers(model))
        assert all(q.zero_point.dtype == torch.float64 for _, q in quantizers(model) if hasattr(q, 'zero_point'))
        model.to(torch.float32)
        assert all(q.delta.dtype == torch.float32 and q.inited for _, q in quantizers(model))
        after = model(x)
    assert torch.equal(after.argmax(1), before.argmax(1))
    assert torch.equal(after, before)


def test_save_load_keeps_top1(tmp_path):
    model = quantized(make_tiny_vit)
    save_quantized(model, str(tmp_path / 'q.pth'), 'tiny', 'tiny', 4, 4)
    assert read_saved(str(tmp_path / 'q.pth'))['version'] == VERSION == 2
    assert 'quantizers' not in read_saved(str(tmp_path / 'q.pth'))
    loaded, _ = load_quantized(str(tmp_path / 'q.pth'), model=make_tiny_vit(seed=9))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x).argmax(1), model(x).argmax(1))


def _version_1_payload(model):
    """A file as version 1 wrote it: quantizer parameters in a dict of their own, outside the state dict."""
    names = {name for name, _ in quantizers(model)}
    state = {k: v for k, v in model.state_dict().items() if k.rsplit('.', 1)[0] not in names}
    qs = {}
    for name, q in quantizers(model):
        qs[name] = {'n_bits': q.n_bits, 'delta': q.delta}
        if hasattr(q, 'zero_point'):
            qs[name].update(channel_wise=q.channel_wise, zero_point=q.zero_point)
    return {'format': FORMAT, 'version': 1, 'model': 'tiny', 'timm_name': 'tiny', 'w_bits': 4, 'a_bits': 4,
            'compensated': True, 'state_dict': state, 'quantizers': qs, 'meta': {'seed': 0}}


@pytest.mark.parametrize('make', [make_tiny_vit, make_tiny_swin], ids=['vit', 'swin'])
def test_version_1_file_still_loads(make, tmp_path):
    model = quantized(make)
    torch.save(_version_1_payload(model), tmp_path / 'v1.pth')
    loaded, payload = load_quantized(str(tmp_path / 'v1.pth'), model=make(seed=4))
    assert payload['meta'] == {'seed': 0}
    for (name, q), (_, q2) in zip(quantizers(model), quantizers(loaded)):
        assert q2.inited and torch.equal(q2.delta, q.delta), name
        if hasattr(q, 'zero_point'):
            assert torch.equal(q2.zero_point, q.zero_point) and q2.channel_wise is q.channel_wise
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_version_1_file_missing_a_quantizer_is_refused(tmp_path):
    payload = _version_1_payload(quantized(make_tiny_vit))
    del payload['quantizers']['blocks.1.block.mlp.fc2.input_quantizer']
    torch.save(payload, tmp_path / 'v1.pth')
    with pytest.raises(UserError, match=r'--load .*v1.pth does not fit tiny: missing keys '
                                        r'blocks\.1\.block\.mlp\.fc2\.input_quantizer\.inited'):
        load_quantized(str(tmp_path / 'v1.pth'), model=make_tiny_vit())


def _uncalibrate(state):
    state['head.input_quantizer.inited'] = torch.tensor(False)


def _drop_zero_point(state):
    del state['blocks.0.block.mlp.fc2.input_quantizer.zero_point']


@pytest.mark.parametrize('damage,quantizer', [(_uncalibrate, 'head.input_quantizer'),
                                              (_drop_zero_point, 'blocks.0.block.mlp.fc2.input_quantizer')])
def test_file_with_an_uncalibrated_or_incomplete_quantizer_is_refused(tmp_path, damage, quantizer):
    model = quantized(make_tiny_vit)
    path = str(tmp_path / 'q.pth')
    save_quantized(model, path, 'tiny', 'tiny', 4, 4)
    payload = read_saved(path)
    damage(payload['state_dict'])
    with pytest.raises(UserError, match=f'has no calibrated parameters for quantizer {quantizer}: '
                                        'the file is incomplete; re-run --save'):
        load_quantized(path, payload=payload, model=make_tiny_vit())


def test_load_file_with_python_objects_needs_trust(tmp_path):
    import argparse
    model = quantized(make_tiny_vit)
    path = str(tmp_path / 'q.pth')
    save_quantized(model, path, 'tiny', 'tiny', 4, 4, meta={'args': argparse.Namespace(seed=0)})
    with pytest.raises(UserError) as info:
        read_saved(path)
    message = str(info.value)
    assert message == (f'--load {path} holds Python objects other than tensors (argparse.Namespace), which are not '
                       'unpickled unless trusted: re-run --save to write it anew, or pass --trust_checkpoint if you '
                       'trust the file')
    loaded, payload = load_quantized(path, model=make_tiny_vit(), trust=True)
    assert payload['meta']['args'].seed == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_trust_checkpoint_flag_reaches_load(tmp_path, capsys, monkeypatch):
    """--load of a file with Python objects: a one-line error without the flag; with it, it is read."""
    import argparse
    from utils.run.demo import make_image_folder
    path = str(tmp_path / 's.pth')
    torch.save({'format': FORMAT, 'version': VERSION, 'model': 'x', 'timm_name': 'deit_tiny_patch16_224',
                'w_bits': 4, 'a_bits': 4, 'compensated': True, 'state_dict': {},
                'meta': {'args': argparse.Namespace()}}, path)
    root = make_image_folder(str(tmp_path / 'd'))
    argv = ['--load', path, '--data_dir', root, '--allow_class_subset', '--output_dir', str(tmp_path / 'o')]
    with pytest.raises(SystemExit) as exc:
        cli.main('vit', argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith('or pass --trust_checkpoint if you trust the file')
    seen = []
    monkeypatch.setattr(pipeline, 'load_quantized', lambda *a, **k: seen.append(a[2]) or (_ for _ in ()).throw(
        UserError('stop here')))
    with pytest.raises(SystemExit):
        cli.main('vit', argv + ['--trust_checkpoint'])
    assert len(seen) == 1 and isinstance(seen[0]['meta']['args'], argparse.Namespace)
