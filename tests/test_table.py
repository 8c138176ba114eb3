"""The results table: matching result.json files to the paper's rows, deltas, notes, Markdown / CSV
output, and the tools/make_table.py command line."""
import csv
import filecmp
import io
import json
import os
import subprocess
import sys

import pytest

from utils import table
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CSV = os.path.join(ROOT, '..', 'shared', 'paper-results.csv')


def result(timm_name='deit_small_patch16_224', w=4, a=4, repq=69.12, qwt=70.2, model='deit_small', **extra):
    return {'model': model, 'timm_name': timm_name, 'w_bits': w, 'a_bits': a, 'repq_top1': repq, 'repq_top5': 90.0,
            'qwt_top1': qwt, 'qwt_top5': 91.0, 'num_val': 50000, 'world_size': 1, 'seed': 0, **extra}


def write_result(folder, r):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'result.json')
    with open(path, 'w') as f:
        json.dump(r, f)
    return path


def loaded(*rs):
    return [dict(r, path=f'run{i}/result.json') for i, r in enumerate(rs)]


def test_paper_csv():
    paper = table.load_paper()
    assert len(paper) == 20
    assert paper[0] == {'model': 'deit_tiny', 'timm_name': 'deit_tiny_patch16_224', 'fp_top1': 72.2, 'bits': 'W4/A4',
                        'repq_vit_top1': 58.2, 'repq_vit_qwt_top1': 61.4}
    assert paper[-1]['timm_name'] == 'swin_small_patch4_window7_224' and paper[-1]['bits'] == 'W6/A6'


def test_paper_csv_is_the_shared_copy():
    if not os.path.exists(SHARED_CSV):
        pytest.skip('no ../shared/paper-results.csv')
    assert filecmp.cmp(SHARED_CSV, table.PAPER_CSV, shallow=False)


def test_match_and_deltas():
    rows, warnings = table.build_rows(table.load_paper(), loaded(result(), result(w=6, a=6, repq=None, qwt=79.35)))
    assert warnings == [] and len(rows) == 20
    s4, s6 = rows[2], rows[3]
    assert (s4['model'], s4['fp_top1'], s4['bits'], s4['paper_repq'], s4['paper_qwt']) == \
        ('DeiT-S', 79.9, 'W4/A4', 69.0, 71.5)
    assert (s4['repq'], s4['qwt']) == (69.12, 70.2)
    assert s4['delta_repq'] == pytest.approx(0.12) and s4['delta_qwt'] == pytest.approx(-1.3)
    assert s6['repq'] is None and s6['delta_repq'] is None and s6['delta_qwt'] == pytest.approx(0.25)
    assert rows[0]['model'] == 'DeiT-T' and rows[0]['repq'] is None and rows[0]['delta_qwt'] is None
    assert [r['model'] for r in rows[6::2]] == ['DeiT-T-distilled', 'DeiT-S-distilled', 'DeiT-B-distilled',
                                                 'ViT-S', 'ViT-B', 'Swin-T', 'Swin-S']


def test_unknown_configurations_get_their_own_rows():
    rs = loaded(result('vit_tiny_patch16_224', model='vit_tiny_patch16_224', w=8, a=8, repq=75.0, qwt=75.5),
                result(w=8, a=8, repq=79.5, qwt=79.7, model='deit_small_patch16_224'),
                result(w=3, a=3, repq=1.0, qwt=2.0))
    rows, _ = table.build_rows(table.load_paper(), rs)
    assert len(rows) == 23
    extra = rows[20:]
    assert [(r['model'], r['bits']) for r in extra] == [('DeiT-S', 'W3/A3'), ('DeiT-S', 'W8/A8'),
                                                        ('vit_tiny_patch16_224', 'W8/A8')]
    assert all(r['paper_repq'] is None and r['paper_qwt'] is None for r in extra)
    assert all(r['delta_repq'] is None and r['delta_qwt'] is None for r in extra)
    assert extra[1]['fp_top1'] == 79.9 and extra[2]['fp_top1'] is None  # FP depends on the model only
    assert extra[2]['repq'] == 75.0 and extra[2]['qwt'] == 75.5


def test_only_results():
    rs = loaded(result('swin_tiny_patch4_window7_224', model='swin_tiny', w=6, a=6), result(),
                result('vit_tiny_patch16_224', model='vit_tiny'))
    rows, _ = table.build_rows(table.load_paper(), rs, only_results=True)
    assert [(r['model'], r['bits']) for r in rows] == [('DeiT-S', 'W4/A4'), ('Swin-T', 'W6/A6'), ('vit_tiny', 'W4/A4')]


def test_duplicate_last_wins_with_warning():
    rows, warnings = table.build_rows(table.load_paper(), loaded(result(repq=60.0), result(repq=68.0)))
    assert rows[2]['repq'] == 68.0 and rows[2]['delta_repq'] == pytest.approx(-1.0)
    assert len(warnings) == 1
    assert 'deit_small_patch16_224 W4/A4' in warnings[0] and 'run0/result.json' in warnings[0]
    assert 'run1/result.json' in warnings[0]


def test_notes():
    rs = loaded(result(weights='random', num_val=1000, val_total=50000, demo=True),
                result(w=6, a=6, weights='pretrained', num_val=50000, val_total=50000, demo=False),
                result('deit_base_patch16_224', num_val=10, val_total=50000),
                result('deit_tiny_patch16_224', weights='loaded', source_weights='random'))
    rows, _ = table.build_rows(table.load_paper(), rs)
    assert rows[0]['note'] == 'random weights'  # a --load run of a model quantized from random weights
    assert rows[2]['note'] == 'random weights; val subset 1000/50000; demo'
    assert rows[3]['note'] == ''
    assert rows[4]['note'] == 'val subset 10/50000'


def test_markdown():
    rs = loaded(result(weights='random'), result(w=6, a=6, repq=None, qwt=79.35))
    rows, _ = table.build_rows(table.load_paper(), rs)
    lines = table.to_markdown(rows).splitlines()
    assert lines[0] == ('| model | FP | bits | RepQ-ViT (paper) | RepQ-ViT + QwT (paper) | RepQ-ViT (this project) '
                        '| RepQ-ViT + QwT (this project) | Δ RepQ-ViT | Δ QwT | note |')
    assert lines[1] == '|---|---|---|---|---|---|---|---|---|---|'
    assert lines[2] == '| DeiT-T | 72.2 | W4/A4 | 58.2 | 61.4 |  |  |  |  |  |'
    assert lines[4] == '| DeiT-S | 79.9 | W4/A4 | 69.0 | 71.5 | 69.12 | 70.20 | +0.12 | -1.30 | random weights |'
    assert lines[5] == '| DeiT-S | 79.9 | W6/A6 | 78.9 | 79.1 |  | 79.35 |  | +0.25 |  |'
    assert len(lines) == 22


def test_csv_round_trip():
    rows, _ = table.build_rows(table.load_paper(), loaded(result(), result('vit_tiny_patch16_224', model='vit_tiny')))
    back = list(csv.DictReader(io.StringIO(table.to_csv(rows))))
    assert list(back[0]) == list(table.FIELDS) and len(back) == 21
    assert back[0]['model'] == 'DeiT-T' and back[0]['repq'] == '' and back[0]['delta_qwt'] == ''
    assert float(back[2]['repq']) == 69.12 and float(back[2]['delta_repq']) == rows[2]['delta_repq']
    assert back[20]['model'] == 'vit_tiny' and back[20]['fp_top1'] == '' and back[20]['paper_qwt'] == ''


def test_find_and_load_results(tmp_path):
    b = write_result(tmp_path / 'b_w4a4', result())
    a = write_result(tmp_path / 'deep' / 'a_w6a6', result(w=6, a=6))
    (tmp_path / 'notes.json').write_text('{}')
    assert table.find_results([str(tmp_path)]) == sorted([a, b])
    assert table.find_results([b, str(tmp_path)]) == [b, a]  # argument order, each file once
    assert table.load_results([b])[0]['path'] == b
    with pytest.raises(UserError, match='does not exist'):
        table.find_results([str(tmp_path / 'nope')])
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(UserError, match='no result.json under'):
        table.find_results([str(tmp_path / 'empty')])
    bad = tmp_path / 'bad.json'
    bad.write_text('{"timm_name": ')
    with pytest.raises(UserError, match='bad.json: not a readable result.json'):
        table.load_results([str(bad)])
    bad.write_text('{"timm_name": "x", "w_bits": 4}')
    with pytest.raises(UserError, match='bad.json: missing key.* a_bits'):
        table.load_results([str(bad)])


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'make_table.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli(tmp_path):
    write_result(tmp_path / 'runs' / 'deit_small_w4a4', result(weights='random'))
    p = run_cli('runs', '--output', 'tmp/x', cwd=tmp_path)  # not the repository root: sys.path is set up
    assert p.returncode == 0, p.stderr
    md = (tmp_path / 'tmp' / 'x.md').read_text()
    assert p.stdout == md and '| DeiT-S | 79.9 | W4/A4 | 69.0 | 71.5 | 69.12 | 70.20 | +0.12 | -1.30 |' in md
    assert len(list(csv.DictReader(open(tmp_path / 'tmp' / 'x.csv')))) == 20
    assert 'wrote tmp/x.md and tmp/x.csv' in p.stderr

    p = run_cli('runs', '--output', 'tmp/y', '--only-results', cwd=tmp_path)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 3


def test_cli_errors(tmp_path):
    p = run_cli(str(tmp_path / 'missing'), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith('error:') and 'missing' in p.stderr
    assert 'Traceback' not in p.stderr
    bad = write_result(tmp_path / 'run', result())
    with open(bad, 'w') as f:
        f.write('{"model": "deit_small", ')
    p = run_cli(str(tmp_path), '--output', str(tmp_path / 'out'), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith('error:') and bad in p.stderr and 'Traceback' not in p.stderr
    assert not os.path.exists(tmp_path / 'out.md')
