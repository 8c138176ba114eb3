"""--ptq: the method registry, the flag's one-line refusals (nothing written), the output folder it names, the
table reading result files of every method and of before --ptq, and brevitas under a two-process gloo group
(rank 0's quantizer parameters and QwT fit on both ranks). The demos of every method: test_ptq_demos.py."""
import json
import os

import pytest
import torch

from conftest import free_port, gloo_group, make_tiny_resnet, make_tiny_vit, run_ranks
from utils.run import cli, ptq
from utils.run.naming import output_folder
from utils.table import results as table

WORLD = 2


def usage_error(capsys, family, *argv):
    """The entry point's usage error: exit 2, its last stderr line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(family, list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert 'Traceback' not in err
    return err.splitlines()[-1]


# ---- the registry and the flag ---------------------------------------------------------------------

def test_registry_defaults_and_labels():
    assert [ptq.default(f).label for f in ('vit', 'swin', 'resnet')] == ['RepQ-ViT', 'RepQ-ViT', 'Percentile']
    assert not ptq.METHODS['repq'].fp_model and not ptq.METHODS['percentile'].fp_model  # the published path
    for name in ('brevitas-minmax', 'brevitas-gptq'):
        m = ptq.METHODS[name]
        assert m.fp_model and m.requires == 'brevitas' and set(m.families) == {'vit', 'swin', 'resnet'}
        assert callable(m.function())
    assert ptq.locked_version('brevitas') == '0.13.4'


@pytest.mark.parametrize('family,argv,expected', [
    ('vit', ['--ptq', 'nope'], "--ptq nope: unknown method; choose one of repq, percentile, brevitas-minmax, "
                               "brevitas-gptq"),
    ('resnet', ['--ptq', 'repq'], "--ptq repq (RepQ-ViT) does not apply to resnet models; for them choose one of "
                                  "percentile, brevitas-minmax, brevitas-gptq"),
    ('swin', ['--ptq', 'percentile'], "--ptq percentile (Percentile) does not apply to swin models; for them choose "
                                      "one of repq, brevitas-minmax, brevitas-gptq"),
    ('vit', ['--ptq', 'brevitas-gptq', '--save', 'x.pth'], "--save writes the project's own quantizers, not brevitas "
                                                          "GPTQ's (--ptq brevitas-gptq): leave out --save"),
    ('vit', ['--ptq', 'brevitas-minmax', '--calib_search', 'per_channel'],
     '--calib_search per_channel applies to --ptq repq only, not to --ptq brevitas-minmax: leave out --calib_search'),
    ('resnet', ['--ptq', 'brevitas-minmax', '--conv_a_bits', 'a_bits'],
     '--conv_a_bits a_bits applies to --ptq percentile only, not to --ptq brevitas-minmax: leave out --conv_a_bits'),
])
def test_bad_ptq_is_one_line_and_writes_nothing(capsys, tmp_path, family, argv, expected):
    out = tmp_path / 'out'
    line = usage_error(capsys, family, '--demo', '--output_dir', str(out), *argv)
    assert line.endswith('error: ' + expected)
    assert not out.exists() and not (tmp_path / 'x.pth').exists()


def test_brevitas_missing_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    """brevitas not importable (sys.modules' None entry: an import fails as if it were not installed)."""
    import sys
    monkeypatch.setitem(sys.modules, 'brevitas', None)
    out = tmp_path / 'out'
    line = usage_error(capsys, 'swin', '--demo', '--ptq', 'brevitas-minmax', '--output_dir', str(out))
    assert line.endswith('error: --ptq brevitas-minmax needs brevitas, which is not installed: '
                         'pip install brevitas==0.13.4')
    assert not out.exists()


def test_a_method_other_than_the_default_names_the_output_folder():
    assert output_folder('vit_digits', 2, 4, demo=True, ptq='brevitas-gptq') == os.path.join(
        'output', 'demo_vit_digits_w2a4_brevitas-gptq')
    assert cli.parse_args('vit', ['--demo', '--ptq', 'brevitas-minmax']).output_dir == os.path.join(
        'output', 'demo_vit_digits_w2a4_brevitas-minmax')
    for argv in ([], ['--ptq', 'repq']):  # the default, named or not: the folder of before
        args = cli.parse_args('vit', ['--demo', *argv])
        assert (args.ptq, args.output_dir) == ('repq', os.path.join('output', 'demo_vit_digits_w2a4'))
    assert cli.parse_args('resnet', ['--demo']).ptq == 'percentile'
    assert cli.parse_args('vit', ['--demo', '--eval', 'ptq']).eval == 'ptq'


# ---- the table: every method, and result files written before --ptq ---------------------------------

def _write(folder, r):
    os.makedirs(folder)
    with open(os.path.join(folder, 'result.json'), 'w') as f:
        json.dump(r, f)


def test_table_reads_old_and_new_result_files(tmp_path, capsys):
    """Old files, written by hand as the pipeline wrote them before --ptq: a ResNet with its Percentile figures
    under repq_* (method named), a DeiT with no method at all; next to a new brevitas file of the DeiT."""
    from tools import make_table
    base = {'w_bits': 4, 'a_bits': 4, 'eval': 'both', 'seed': 0, 'num_val': 50000, 'val_total': 50000,
            'weights': 'checkpoint', 'demo': False, 'num_calib': 32, 'num_qwt': 512, 'start_block': 0,
            'qwt_solver': 'inverse', 'qwt_accumulate': 'concat', 'fp_top1': None}
    _write(str(tmp_path / 'r18'), {**base, 'model': 'resnet18', 'timm_name': 'resnet18', 'method': 'Percentile',
                                   'kernel_size': 1, 'factor': 64, 'conv_a_bits': '8',
                                   'repq_top1': 60.5, 'repq_top5': 80.0, 'qwt_top1': 68.25, 'repq_size_mb': 6.0})
    _write(str(tmp_path / 'deit'), {**base, 'model': 'deit_tiny', 'timm_name': 'deit_tiny_patch16_224',
                                    'repq_top1': 57.75, 'qwt_top1': 61.5})
    _write(str(tmp_path / 'deit_brevitas'), {**base, 'model': 'deit_tiny', 'timm_name': 'deit_tiny_patch16_224',
                                             'ptq': 'brevitas-gptq', 'method': 'brevitas GPTQ',
                                             'ptq_top1': 40.5, 'qwt_top1': 50.25})
    make_table.main([str(tmp_path), '--only-results', '--output', str(tmp_path / 'table')])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('| model | bits | method | FP (paper) | FP (this project) | PTQ (paper) | PTQ + QwT '
                               '(paper) | PTQ (this project) | PTQ + QwT (this project) |')
    assert lines[2:] == [
        '| DeiT-T | W4/A4 | RepQ-ViT | 72.2 |  | 58.2 | 61.4 | 57.75 | 61.50 |  | -0.45 | +0.10 | 1 |  |',
        '| DeiT-T | W4/A4 | brevitas GPTQ | 72.2 |  |  |  | 40.50 | 50.25 |  |  |  | 1 | brevitas GPTQ |',
        '| ResNet-18 | W4/A4 | Percentile | 71.0 |  | 58.3 | 68.9 | 60.50 | 68.25 |  | +2.20 | -0.65 | 1 |  |']
    rows = list(__import__('csv').DictReader(open(tmp_path / 'table.csv')))
    assert [r['method'] for r in rows] == ['RepQ-ViT', 'brevitas GPTQ', 'Percentile']


def test_upgrade_of_an_old_record():
    old = {'timm_name': 'resnet50', 'method': 'Percentile', 'repq_top1': 1.0, 'repq_top5': 2.0, 'repq_size_mb': 3.0}
    assert table.upgrade(old) == {'timm_name': 'resnet50', 'method': 'Percentile', 'ptq': 'percentile',
                                  'ptq_top1': 1.0, 'ptq_top5': 2.0, 'ptq_size_mb': 3.0}
    assert table.upgrade({'timm_name': 'vit_base_patch16_224'})['ptq'] == 'repq'
    new = {'timm_name': 'resnet50', 'ptq': 'brevitas-minmax', 'method': 'brevitas min-max', 'ptq_top1': 5.0}
    assert table.upgrade(new) == new


# ---- brevitas on a model, in one process and under gloo ---------------------------------------------

def test_brevitas_quantizes_every_linear_and_conv_at_the_bits_asked():
    import brevitas.nn as qnn
    from quant import model_size_mb
    from quant.ptq.brevitas_ptq import minmax_ptq
    for model, first, heads in ((make_tiny_vit(prepare=False), 'patch_embed.proj', ('head',)),
                                (make_tiny_resnet(), 'conv1', ('fc',))):
        n_layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
        calib = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        state = torch.get_rng_state()
        minmax_ptq(model, calib, 3, 5)
        assert torch.equal(torch.get_rng_state(), state)  # the global generator untouched (SPEC §1b draws)
        quantized = {n: m for n, m in model.named_modules() if isinstance(m, (qnn.QuantLinear, qnn.QuantConv2d))}
        assert len(quantized) == n_layers
        for name, m in quantized.items():
            edge = name == first or name in heads
            assert int(m.weight_quant.bit_width()) == (8 if edge else 3), name
            assert int(m.input_quant.bit_width()) == (8 if edge else 5), name
            assert m.weight_quant.scale().numel() == m.weight.shape[0]  # per output channel
            assert m.input_quant.scale().numel() == 1  # per tensor
        weights = {id(m.weight): m.weight.numel() for m in quantized.values()}
        low = sum(n for name, m in quantized.items() for i, n in weights.items()
                  if id(m.weight) == i and not (name == first or name in heads))
        eight = sum(weights.values()) - low
        others = sum(p.numel() for p in model.parameters()) - sum(weights.values())
        assert model_size_mb(model) == pytest.approx((low * 3 + eight * 8 + others * 32) / 8 / 1e6)


def _gloo_worker(rank, port, out_path):
    from quant import qwt_compensate
    from quant.ptq.brevitas_ptq import minmax_ptq
    with gloo_group(rank, WORLD, port, 60):
        model = make_tiny_vit(seed=0)
        fp = make_tiny_vit(seed=0)
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees other images: rank 0's must win
        calib = torch.randn(8, 3, 32, 32, generator=g)
        minmax_ptq(model, calib, 4, 4)
        quantizers = {k: v.clone() for k, v in model.state_dict().items()}  # weights and activation scales
        stats = []
        qwt_compensate(model, torch.randn(8, 3, 32, 32, generator=g), batch_size=4, fp_model=fp, stats=stats)
        comp = {k: v.clone() for k, v in model.state_dict().items() if 'comp_' in k}
        torch.save({'quantizers': quantizers, 'comp': comp, 'stats': stats}, out_path.format(rank=rank))


def test_two_gloo_processes_take_rank0s_quantizers_and_fit(tmp_path):
    out = str(tmp_path / 'rank{rank}.pt')
    run_ranks(_gloo_worker, (free_port(), out), WORLD)
    r0, r1 = (torch.load(out.format(rank=r)) for r in range(WORLD))
    scales = [k for k in r0['quantizers'] if k.endswith('input_quant.fused_activation_quant_proxy.tensor_quant.'
                                                          'scaling_impl.value')]
    assert len(scales) == 3 * 4 + 2 and r0['quantizers'].keys() == r1['quantizers'].keys()  # every Linear / Conv2d
    for k in r0['quantizers']:
        assert torch.equal(r0['quantizers'][k], r1['quantizers'][k]), k
    assert len(r0['comp']) == 2 * 3 and any(v.abs().sum() > 0 for v in r0['comp'].values())
    for k in r0['comp']:
        assert torch.equal(r0['comp'][k], r1['comp'][k]), k
    assert r0['stats'] == r1['stats']


# ---- the table runner: a row per method ------------------------------------------------------------

def test_runner_plans_a_row_per_method(tmp_path):
    from utils.core.errors import UserError
    from utils.runner import cells as table_cells, flags as runner_flags
    ckpts, data = tmp_path / 'ckpts', tmp_path / 'data'
    os.makedirs(ckpts)
    os.makedirs(data)
    (ckpts / 'deit_tiny_patch16_224-a1311bcf.pth').write_bytes(b'')  # only checked for existence at plan time
    base = ['--data_dir', str(data), '--models', 'deit_tiny', '--bits', '4', '--seeds', '0', '--device', 'cpu',
            '--output_dir', str(tmp_path / 'out'), '--checkpoint_dir', str(ckpts)]
    args = runner_flags.build_parser().parse_args([*base, '--ptq', 'default', 'brevitas-minmax', 'repq'])
    cells, _ = table_cells.plan(args)
    assert [(c.label, c.method, c.ptq) for c in cells] == [
        ('deit_tiny FP', 'RepQ-ViT', None), ('deit_tiny W4/A4 seed 0', 'RepQ-ViT', 'repq'),
        ('deit_tiny W4/A4 brevitas min-max seed 0', 'brevitas min-max', 'brevitas-minmax')]
    assert '--ptq' not in cells[1].flags and cells[1].folder == str(tmp_path / 'out' / 'deit_tiny_w4a4_seed0')
    assert cells[2].flags[-6:-4] == ('--ptq', 'brevitas-minmax')
    assert cells[2].folder == str(tmp_path / 'out' / 'deit_tiny_w4a4_brevitas-minmax_seed0')
    r = {'timm_name': 'deit_tiny_patch16_224', 'eval': 'both', 'w_bits': 4, 'a_bits': 4, 'seed': 0,
         'ptq': 'brevitas-minmax', 'ptq_top1': 1.0, 'qwt_top1': 2.0}
    assert table_cells.result_problem(cells[2], r) is None
    assert table_cells.result_problem(cells[1], r) == "result.json has ptq 'brevitas-minmax', expected 'repq'"
    old = {k: v for k, v in r.items() if k not in ('ptq', 'ptq_top1')}
    assert table_cells.result_problem(cells[1], {**old, 'repq_top1': 1.0}) is None  # written before --ptq
    bad = runner_flags.build_parser().parse_args([*base, '--ptq', 'percentile'])
    with pytest.raises(UserError, match=r'^--ptq percentile \(Percentile\) does not apply to vit models'):
        table_cells.plan(bad)
