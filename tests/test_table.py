"""The results table: result.json files entering by configuration (exclusions, variants, newest wins), mean
and sample std over seeds, the FP column from --eval fp runs, deltas, notes, Markdown / CSV output, and the
tools/make_table.py command line."""
import csv
import filecmp
import io
import json
import math
import os
import subprocess
import sys

import pytest

from utils.table import results as table
from utils.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ('| model | bits | FP (paper) | FP (this project) | RepQ-ViT (paper) | RepQ-ViT + QwT (paper) | '
          'RepQ-ViT (this project) | RepQ-ViT + QwT (this project) | Δ FP | Δ RepQ-ViT | Δ QwT | n | note |')


def result(timm_name='deit_small_patch16_224', w=4, a=4, repq=69.12, qwt=70.2, model='deit_small', seed=0, **extra):
    return {'model': model, 'timm_name': timm_name, 'w_bits': w, 'a_bits': a, 'eval': 'both', 'seed': seed,
            'repq_top1': repq, 'repq_top5': 90.0, 'qwt_top1': qwt, 'qwt_top5': 91.0, 'fp_top1': None,
            'num_val': 50000, 'val_total': 50000, 'world_size': 1, 'weights': 'pretrained', 'demo': False,
            'num_calib': 32, 'num_qwt': 512, 'start_block': 0, 'qwt_solver': 'inverse', 'qwt_accumulate': 'concat',
            **extra}


def fp_result(timm_name='deit_small_patch16_224', fp=79.5, model='deit_small', **extra):
    r = result(timm_name, repq=None, qwt=None, model=model, **extra)
    r.update({'eval': 'fp', 'fp_top1': fp, 'num_calib': None, 'num_qwt': None, 'start_block': None,
              'qwt_solver': None, 'qwt_accumulate': None})
    r.update(extra)
    return r


def write_result(folder, r, mtime=None):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'result.json')
    with open(path, 'w') as f:
        json.dump(r, f)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def loaded(*rs):
    """Results as load_results returns them, made in argument order (later = newer)."""
    return [dict(r, path=f'run{i}/result.json', mtime=i) for i, r in enumerate(rs)]


def row_of(rows, model, bits, note=''):
    found = [r for r in rows if (r['model'], r['bits'], r['note']) == (model, bits, note)]
    assert len(found) == 1, [(r['model'], r['bits'], r['note']) for r in rows]
    return found[0]


def test_paper_csv():
    paper = table.load_paper()
    assert len(paper) == 20 + 6
    assert paper[0] == {'model': 'deit_tiny', 'timm_name': 'deit_tiny_patch16_224', 'fp_top1': 72.2, 'bits': 'W4/A4',
                        'repq_vit_top1': 58.2, 'repq_vit_qwt_top1': 61.4, 'qwtstar_top1': 64.8}
    assert paper[19]['timm_name'] == 'swin_small_patch4_window7_224' and paper[19]['bits'] == 'W6/A6'
    # the published ResNet rows (SPEC §3b), their own CSV's columns read into the same fields
    assert paper[20] == {'model': 'resnet18', 'timm_name': 'resnet18', 'fp_top1': 71.0, 'bits': 'W4/A4',
                         'repq_vit_top1': 58.3, 'repq_vit_qwt_top1': 68.9, 'method': 'Percentile'}
    assert [(p['model'], p['bits'], p['repq_vit_top1'], p['repq_vit_qwt_top1']) for p in paper[21:]] == [
        ('resnet18', 'W6/A6', 70.7, 71.0), ('resnet50', 'W4/A4', 68.4, 74.5), ('resnet50', 'W6/A6', 76.0, 76.8),
        ('resnet101', 'W4/A4', 74.7, 76.4), ('resnet101', 'W6/A6', 77.1, 77.2)]
    assert {p['fp_top1'] for p in paper[22:24]} == {76.6} and paper[-1]['fp_top1'] == 77.3


@pytest.mark.parametrize('shared_name, attr', [('paper-results.csv', 'PAPER_CSV'),
                                               ('paper-results-resnet.csv', 'PAPER_RESNET_CSV'),
                                               ('paper-results-qwtstar.csv', 'PAPER_QWTSTAR_CSV')])
def test_paper_csvs_are_the_shared_copies(shared_name, attr):
    shared = os.path.join(ROOT, '..', 'shared', shared_name)
    if not os.path.exists(shared):
        pytest.skip(f'no ../shared/{shared_name}')
    assert filecmp.cmp(shared, getattr(table, attr), shallow=False)


def test_resnet_rows_name_the_percentile_method():
    """A ResNet-only table names its PTQ columns Percentile; a table of both has PTQ columns and a method
    column."""
    rn = result('resnet18', model='resnet18', repq=57.5, qwt=68.25, method='Percentile')
    rows, _ = table.build_rows(table.load_paper(), loaded(rn), only_results=True)
    lines = table.to_markdown(rows).splitlines()
    assert lines[0] == ('| model | bits | FP (paper) | FP (this project) | Percentile (paper) | Percentile + QwT (paper) '
                        '| Percentile (this project) | Percentile + QwT (this project) | Δ FP | Δ Percentile | Δ QwT '
                        '| n | note |')
    assert lines[2] == '| ResNet-18 | W4/A4 | 71.0 |  | 58.3 | 68.9 | 57.50 | 68.25 |  | -0.80 | -0.65 | 1 |  |'
    rows, _ = table.build_rows(table.load_paper(), loaded(rn, result()), only_results=True)
    lines = table.to_markdown(rows).splitlines()
    assert lines[0].startswith('| model | bits | method | FP (paper) | FP (this project) | PTQ (paper) | PTQ + QwT '
                               '(paper) | PTQ (this project) |')
    assert lines[2].startswith('| DeiT-S | W4/A4 | RepQ-ViT | 79.9 |') and lines[3].startswith(
        '| ResNet-18 | W4/A4 | Percentile | 71.0 |')
    back = list(csv.DictReader(io.StringIO(table.to_csv(rows))))
    assert [r['method'] for r in back] == ['RepQ-ViT', 'Percentile']
    # the real A-bit convolution input (--conv_a_bits a_bits) is not the published setting: a row of its own
    rows, _ = table.build_rows(table.load_paper(), loaded(dict(rn, conv_a_bits='a_bits')), only_results=True)
    assert [r['note'] for r in rows] == ['conv_a_bits a_bits']


def test_match_and_deltas():
    rows, warnings = table.build_rows(table.load_paper(table.PAPER_CSV), loaded(result(), result(w=6, a=6, repq=None, qwt=79.35)))
    assert warnings == [] and len(rows) == 20
    s4, s6 = rows[2], rows[3]
    assert (s4['model'], s4['bits'], s4['paper_fp'], s4['paper_repq'], s4['paper_qwt']) == \
        ('DeiT-S', 'W4/A4', 79.9, 69.0, 71.5)
    assert (s4['repq'], s4['qwt'], s4['n'], s4['repq_std'], s4['seeds']) == (69.12, 70.2, 1, None, '0')
    assert s4['delta_repq'] == pytest.approx(0.12) and s4['delta_qwt'] == pytest.approx(-1.3)
    assert s4['fp'] is None and s4['delta_fp'] is None
    assert s6['repq'] is None and s6['repq_n'] == 0 and s6['delta_repq'] is None
    assert s6['delta_qwt'] == pytest.approx(0.25)
    assert rows[0]['model'] == 'DeiT-T' and rows[0]['repq'] is None and rows[0]['n'] == 0
    assert [r['model'] for r in rows[6::2]] == ['DeiT-T-distilled', 'DeiT-S-distilled', 'DeiT-B-distilled',
                                                 'ViT-S', 'ViT-B', 'Swin-T', 'Swin-S']


def test_mean_and_sample_std_over_seeds():
    """repq 60, 61, 65: mean 62, sample variance (4 + 1 + 9) / 2 = 7; qwt 70, 70.5, 71.5: mean 70.6667,
    variance (0.4444 + 0.0278 + 0.6944) / 2 = 0.58333."""
    rs = loaded(result(repq=60.0, qwt=70.0, seed=0), result(repq=61.0, qwt=70.5, seed=1),
                result(repq=65.0, qwt=71.5, seed=2))
    rows, warnings = table.build_rows(table.load_paper(), rs, only_results=True)
    assert warnings == [] and len(rows) == 1
    r = rows[0]
    assert (r['repq'], r['repq_n'], r['n'], r['seeds']) == (62.0, 3, 3, '0 1 2')
    assert r['repq_std'] == pytest.approx(math.sqrt(7), abs=1e-4)
    assert r['qwt'] == pytest.approx(70.6667) and r['qwt_std'] == pytest.approx(math.sqrt(0.58333), abs=1e-4)
    assert r['delta_repq'] == pytest.approx(-7.0) and r['delta_qwt'] == pytest.approx(-0.8333)
    assert table.to_markdown(rows).splitlines()[2] == \
        '| DeiT-S | W4/A4 | 79.9 |  | 69.0 | 71.5 | 62.00 ± 2.65 | 70.67 ± 0.76 |  | -7.00 | -0.83 | 3 |  |'
    assert table.mean_std([1.0, None, 2.0]) == (1.5, pytest.approx(math.sqrt(0.5)), 2)
    assert table.mean_std([None]) == (None, None, 0)


def test_a_column_with_fewer_seeds_says_so():
    rows, _ = table.build_rows(table.load_paper(), loaded(result(seed=0), result(seed=1, repq=None, qwt=71.2)),
                               only_results=True)
    line = table.to_markdown(rows).splitlines()[2]
    assert '| 69.12 (n=1) | 70.70 ± 0.71 |' in line and line.endswith('| 2 |  |')


def test_fp_runs_fill_the_fp_column_of_their_model():
    rs = loaded(result(), fp_result(fp=79.5), fp_result('deit_tiny_patch16_224', fp=72.0, model='deit_tiny'))
    rows, warnings = table.build_rows(table.load_paper(), rs, only_results=True)
    assert warnings == []
    # an FP run is not a W4/A4 run (its w_bits / a_bits are the flags' defaults); the FP-only model shows
    # its paper rows with the FP measured
    assert [(r['model'], r['bits'], r['fp'], r['n']) for r in rows] == \
        [('DeiT-T', 'W4/A4', 72.0, 0), ('DeiT-T', 'W6/A6', 72.0, 0), ('DeiT-S', 'W4/A4', 79.5, 1)]
    assert rows[2]['delta_fp'] == pytest.approx(-0.4) and rows[0]['delta_fp'] == pytest.approx(-0.2)
    assert table.to_markdown(rows).splitlines()[4].startswith('| DeiT-S | W4/A4 | 79.9 | 79.50 | 69.0 | 71.5 |')


def test_non_comparable_runs_are_left_out_unless_included():
    demo = result(repq=1.0, demo=True, weights='random', num_calib=16, num_qwt=32)
    none = result(repq=None, qwt=None, eval='none', seed=1)
    subset = result(repq=68.0, qwt=69.0, num_val=1000, seed=2)
    random_w = result('deit_tiny_patch16_224', model='deit_tiny', weights='loaded', source_weights='random')
    good = result(seed=3)
    rs = loaded(demo, none, subset, random_w, good)
    rows, warnings = table.build_rows(table.load_paper(), rs, only_results=True, include=frozenset())
    assert [(r['model'], r['bits'], r['seeds'], r['note']) for r in rows] == [('DeiT-S', 'W4/A4', '3', '')]
    assert len(warnings) == 1
    # each run counted once, under all its categories: the counts add up to the runs left out
    assert warnings[0].startswith('left out 4 run(s) not comparable with the paper (1 demo+random, 1 eval-none, '
                                  '1 random, 1 subset): run0/result.json, run1/result.json, run2/result.json and 1 more; ')
    assert warnings[0].endswith('add them with --include demo,eval-none,random,subset')

    rows, _ = table.build_rows(table.load_paper(), rs, only_results=True, include=table.parse_include('subset'))
    assert [(r['model'], r['seeds'], r['note']) for r in rows] == \
        [('DeiT-S', '3', ''), ('DeiT-S', '2', 'val subset 1000/50000')]  # a variant: a row of its own
    rows, _ = table.build_rows(table.load_paper(), rs, only_results=True, include=table.parse_include('all'))
    assert [(r['model'], r['seeds'], r['note']) for r in rows] == [
        ('DeiT-T', '0', 'random weights'),
        ('DeiT-S', '1 3', ''),  # --eval none counts as a seed without accuracies
        ('DeiT-S', '2', 'val subset 1000/50000'),  # variants of the data first, then of the method
        ('DeiT-S', '0', 'random weights; demo; 16 calibration images; 32 QwT images')]
    assert rows[1]['repq_n'] == 1 and rows[1]['n'] == 2
    with pytest.raises(UserError, match='--include demo,nope: unknown nope'):
        table.parse_include('demo,nope')


def test_newest_run_of_a_configuration_and_seed_wins(tmp_path):
    """Not the path order: the newer result.json (mtime) is kept, with a warning naming both."""
    old = write_result(tmp_path / 'z_old', result(repq=60.0), mtime=1_000_000)
    new = write_result(tmp_path / 'a_new', result(repq=68.0), mtime=2_000_000)
    other_seed = write_result(tmp_path / 'b', result(repq=62.0, seed=1), mtime=500_000)
    files = table.find_results([str(tmp_path)])
    assert files == [new, other_seed, old]  # path order puts the old run last
    rows, warnings = table.build_rows(table.load_paper(), table.load_results(files), only_results=True)
    assert rows[0]['seeds'] == '0 1' and rows[0]['repq'] == pytest.approx(65.0)  # (68 + 62) / 2
    assert warnings == [f'deit_small_patch16_224 W4/A4 seed 0: kept {new} (newer), left out {old}']
    # FP runs: likewise, per model
    rows, warnings = table.build_rows(table.load_paper(), loaded(fp_result(fp=79.0), fp_result(fp=79.6)),
                                      only_results=True)
    assert rows[0]['fp'] == 79.6 and warnings == [
        'deit_small_patch16_224 FP: kept run1/result.json (newer), left out run0/result.json']


def test_a_run_that_measured_nothing_stays_out_like_eval_none(tmp_path):
    """--eval qwt on a --load file saved without QwT evaluates nothing: its result.json has eval 'qwt' and
    null accuracies (utils/run/pipeline.py make_result). Like an --eval none run it is left out by default, and
    the n column counts only the run with accuracies."""
    nothing = result(repq=None, qwt=None, seed=1, eval='qwt', weights='loaded', source_weights='pretrained',
                     loaded_from='deit_small_w4a4.pth', repq_top5=None, qwt_top5=None, num_qwt=None, qwt_blocks=[])
    none = result(repq=None, qwt=None, seed=2, eval='none', repq_top5=None, qwt_top5=None)
    paths = [write_result(tmp_path / name, r) for name, r in (('a', result()), ('b', nothing), ('c', none))]
    rs = table.load_results(paths)
    assert table.categories(rs[1]) == table.categories(rs[2]) == ['eval-none']
    rows, warnings = table.build_rows(table.load_paper(), rs, only_results=True, include=frozenset())
    assert [(r['model'], r['bits'], r['seeds'], r['n'], r['repq_n'], r['qwt_n']) for r in rows] == \
        [('DeiT-S', 'W4/A4', '0', 1, 1, 1)]
    assert table.to_markdown(rows).splitlines()[2].endswith('| 69.12 | 70.20 |  | +0.12 | -1.30 | 1 |  |')
    assert warnings == [f'left out 2 run(s) not comparable with the paper (2 eval-none): {paths[1]}, {paths[2]}; '
                        'add them with --include eval-none']


def test_same_mtime_keeps_the_later_listed_run(tmp_path):
    """Two runs of one row and seed with equal modification times: the later one in the input order is kept
    (table._newest: 'mtime, then input order'), whichever path sorts first."""
    a = write_result(tmp_path / 'a', result(repq=60.0))
    b = write_result(tmp_path / 'b', result(repq=68.0))
    for path in (a, b):
        os.utime(path, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    for first, second, kept in ((a, b, 68.0), (b, a, 60.0)):
        rows, warnings = table.build_rows(table.load_paper(), table.load_results([first, second]), only_results=True)
        assert (rows[0]['repq'], rows[0]['n']) == (kept, 1)
        assert warnings == [f'deit_small_patch16_224 W4/A4 seed 0: kept {second} (newer), left out {first}']


def test_variants_get_rows_of_their_own():
    rs = loaded(result(), result(qwt_solver='lstsq', qwt=71.0), result(start_block=2, qwt_accumulate='normal'),
                result(w=3, a=3, repq=1.0, qwt=2.0))
    rows, warnings = table.build_rows(table.load_paper(table.PAPER_CSV), rs)
    assert warnings == [] and len(rows) == 23
    assert [(r['model'], r['bits'], r['note']) for r in rows[2:5]] == [
        ('DeiT-S', 'W4/A4', ''), ('DeiT-S', 'W4/A4', 'qwt_accumulate normal; start_block 2'),
        ('DeiT-S', 'W4/A4', 'qwt_solver lstsq')]
    assert rows[4]['qwt'] == 71.0 and rows[4]['paper_qwt'] == 71.5 and rows[4]['delta_qwt'] == pytest.approx(-0.5)
    assert (rows[22]['model'], rows[22]['bits'], rows[22]['paper_repq'], rows[22]['delta_repq'], rows[22]['paper_fp']) \
        == ('DeiT-S', 'W3/A3', None, None, 79.9)


def test_unknown_configurations_get_their_own_rows():
    rs = loaded(result('vit_tiny_patch16_224', model='vit_tiny_patch16_224', w=8, a=8, repq=75.0, qwt=75.5),
                result(w=8, a=8, repq=79.5, qwt=79.7, model='deit_small_patch16_224'),
                result(w=3, a=3, repq=1.0, qwt=2.0))
    rows, _ = table.build_rows(table.load_paper(table.PAPER_CSV), rs)
    assert len(rows) == 23
    extra = rows[20:]
    assert [(r['model'], r['bits']) for r in extra] == [('DeiT-S', 'W3/A3'), ('DeiT-S', 'W8/A8'),
                                                        ('vit_tiny_patch16_224', 'W8/A8')]
    assert all(r['paper_repq'] is None and r['paper_qwt'] is None for r in extra)
    assert all(r['delta_repq'] is None and r['delta_qwt'] is None for r in extra)
    assert extra[1]['paper_fp'] == 79.9 and extra[2]['paper_fp'] is None  # FP depends on the model only
    assert extra[2]['repq'] == 75.0 and extra[2]['qwt'] == 75.5


def test_only_results():
    rs = loaded(result('swin_tiny_patch4_window7_224', model='swin_tiny', w=6, a=6), result(),
                result('vit_tiny_patch16_224', model='vit_tiny'))
    rows, _ = table.build_rows(table.load_paper(), rs, only_results=True)
    assert [(r['model'], r['bits']) for r in rows] == [('DeiT-S', 'W4/A4'), ('Swin-T', 'W6/A6'), ('vit_tiny', 'W4/A4')]


def test_expected_runs_that_are_missing():
    expected = {('deit_small_patch16_224', 'W4/A4'): [0, 1, 2], ('deit_small_patch16_224', 'FP'): [0],
                ('deit_tiny_patch16_224', 'W4/A4'): [0], ('deit_tiny_patch16_224', 'FP'): [0]}
    rs = loaded(result(seed=1), fp_result('deit_tiny_patch16_224', model='deit_tiny', fp=72.1))
    rows, _ = table.build_rows(table.load_paper(), rs, only_results=True, expected=expected)
    assert [(r['model'], r['bits'], r['n'], r['fp'], r['note']) for r in rows] == [
        ('DeiT-T', 'W4/A4', 0, 72.1, 'missing: seed 0'),
        ('DeiT-S', 'W4/A4', 1, None, 'missing: seeds 0, 2; missing: FP')]


def test_skipped_images_are_flagged():
    rs = loaded(result(skipped_images=['train/a/1.JPEG']), result(seed=1, skipped_images=['train/a/1.JPEG',
                                                                                          'val/b/2.JPEG']))
    rows, _ = table.build_rows(table.load_paper(), rs, only_results=True)
    assert rows[0]['note'] == '2 unreadable image(s) skipped'


def test_markdown():
    rs = loaded(result(weights='random'), result(w=6, a=6, repq=None, qwt=79.35), fp_result(fp=79.91))
    rows, _ = table.build_rows(table.load_paper(table.PAPER_CSV), rs, include=table.ALL)  # RepQ-ViT rows alone
    lines = table.to_markdown(rows).splitlines()
    assert lines[0] == HEADER
    assert lines[1] == '|---|---|---|---|---|---|---|---|---|---|---|---|---|'
    assert lines[2] == '| DeiT-T | W4/A4 | 72.2 |  | 58.2 | 61.4 |  |  |  |  |  |  |  |'
    assert lines[4] == '| DeiT-S | W4/A4 | 79.9 | 79.91 | 69.0 | 71.5 |  |  | +0.01 |  |  |  |  |'
    assert lines[5] == ('| DeiT-S | W4/A4 | 79.9 |  | 69.0 | 71.5 | 69.12 | 70.20 |  | +0.12 | -1.30 | 1 | '
                        'random weights |')
    assert lines[6] == '| DeiT-S | W6/A6 | 79.9 | 79.91 | 78.9 | 79.1 |  | 79.35 | +0.01 |  | +0.25 | 1 |  |'
    assert len(lines) == 23


def test_csv_round_trip():
    rows, _ = table.build_rows(table.load_paper(table.PAPER_CSV), loaded(result(), result(seed=1, repq=70.12),
                                                          result('vit_tiny_patch16_224', model='vit_tiny')))
    back = list(csv.DictReader(io.StringIO(table.to_csv(rows))))
    assert list(back[0]) == list(table.FIELDS) and len(back) == 21
    assert back[0]['model'] == 'DeiT-T' and back[0]['repq'] == '' and back[0]['delta_qwt'] == ''
    assert float(back[2]['repq']) == 69.62 and float(back[2]['repq_std']) == pytest.approx(math.sqrt(0.5), abs=1e-4)
    assert (back[2]['n'], back[2]['seeds'], back[2]['timm_name']) == ('2', '0 1', 'deit_small_patch16_224')
    assert back[20]['model'] == 'vit_tiny' and back[20]['paper_fp'] == '' and back[20]['paper_qwt'] == ''


def test_find_and_load_results(tmp_path):
    b = write_result(tmp_path / 'b_w4a4', result())
    a = write_result(tmp_path / 'deep' / 'a_w6a6', result(w=6, a=6))
    (tmp_path / 'notes.json').write_text('{}')
    assert table.find_results([str(tmp_path)]) == sorted([a, b])
    assert table.find_results([b, str(tmp_path)]) == [b, a]  # argument order, each file once
    got = table.load_results([b])[0]
    assert got['path'] == b and got['mtime'] == os.stat(b).st_mtime_ns
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
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    write_result(tmp_path / 'runs' / 'deit_small_w4a4', result())
    write_result(tmp_path / 'runs' / 'demo_deit_small_w4a4', result(repq=1.0, demo=True, weights='random'))
    write_result(tmp_path / 'runs' / 'deit_small_w4a4_sub', result(seed=1, num_val=100))
    p = run_cli('runs', '--output', 'tmp/x', cwd=tmp_path)  # not the repository root: sys.path is set up
    assert p.returncode == 0, p.stderr
    md = (tmp_path / 'tmp' / 'x.md').read_text()
    assert p.stdout == md
    assert '| DeiT-S | W4/A4 | RepQ-ViT | 79.9 |  | 69.0 | 71.5 | 69.12 | 70.20 |  | +0.12 | -1.30 | 1 |  |' in md
    assert '| ResNet-18 | W4/A4 | Percentile | 71.0 |  | 58.3 | 68.9 |  |  |  |  |  |  |  |' in md  # both CSVs
    assert 'demo' not in md and 'subset' not in md
    assert len(list(csv.DictReader(open(tmp_path / 'tmp' / 'x.csv')))) == 20 + 6
    assert 'warning: left out 2 run(s) not comparable with the paper (1 demo+random, 1 subset)' in p.stderr
    assert 'add them with --include demo,random,subset' in p.stderr
    assert 'wrote tmp/x.md, tmp/x.csv' in p.stderr

    p = run_cli('runs', '--output', 'tmp/y', '--only-results', '--include', 'subset', cwd=tmp_path)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 4, p.stdout
    assert p.stdout.splitlines()[3].endswith('| 1 | val subset 100/50000 |')


def test_cli_errors(tmp_path):
    p = run_cli(str(tmp_path / 'missing'), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith('error:') and 'missing' in p.stderr
    assert 'Traceback' not in p.stderr
    p = run_cli(str(tmp_path), '--include', 'everything', cwd=tmp_path)
    assert p.returncode == 2 and p.stderr == 'error: --include everything: unknown everything (use demo, random, ' \
                                             'subset, classes, eval-none or all)\n'
    bad = write_result(tmp_path / 'run', result())
    with open(bad, 'w') as f:
        f.write('{"model": "deit_small", ')
    p = run_cli(str(tmp_path), '--output', str(tmp_path / 'out'), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith('error:') and bad in p.stderr and 'Traceback' not in p.stderr
    assert not os.path.exists(tmp_path / 'out.md')


def test_eval_all_runs_fill_the_fp_column_unless_an_fp_run_does():
    runs = [result(seed=0, eval='all', fp_top1=79.0), result(seed=1, eval='all', fp_top1=80.0)]
    rows, _ = table.build_rows(table.load_paper(), runs, only_results=True)
    assert [(r['bits'], r['fp'], r['delta_fp']) for r in rows] == [('W4/A4', 79.5, -0.4)]  # paper FP 79.9
    rows, _ = table.build_rows(table.load_paper(), [*runs, fp_result(fp=79.7)], only_results=True)
    assert [r['fp'] for r in rows] == [79.7]  # the FP run wins
    rows, _ = table.build_rows(table.load_paper(), [result()], only_results=True)
    assert rows[0]['fp'] is None


def test_class_subset_runs_are_left_out_or_marked():
    """A run on a 10-class folder (--allow_class_subset) scores folder-index labels: never a plain ImageNet row."""
    sub = result('deit_tiny_patch16_224', model='deit_tiny', repq=58.2, qwt=61.4, num_val=40, val_total=40,
                 num_classes=10, train_classes=10, model_classes=1000, allow_class_subset=True)
    full = result(seed=1, num_classes=1000, train_classes=1000, model_classes=1000, allow_class_subset=False)
    rows, warnings = table.build_rows(table.load_paper(), loaded(sub, full), only_results=True, include=frozenset())
    assert [(r['model'], r['seeds']) for r in rows] == [('DeiT-S', '1')]
    assert warnings[0].startswith('left out 1 run(s) not comparable with the paper (1 classes): run0/result.json; ')
    assert warnings[0].endswith('add them with --include classes')
    rows, _ = table.build_rows(table.load_paper(), loaded(sub, full), only_results=True, include=table.ALL)
    assert [(r['model'], r['bits'], r['note']) for r in rows] == [('DeiT-T', 'W4/A4', '10/1000 classes'),
                                                                  ('DeiT-S', 'W4/A4', '')]
    # a train/ of another class count alone (val/ complete) is a class subset too
    assert table.categories(dict(full, train_classes=10)) == ['classes']


def test_left_out_counts_add_up_to_the_runs():
    kinds = [dict(demo=True, weights='random', num_val=10, val_total=40), dict(num_val=10), dict(eval='none'),
             dict(demo=True, weights='random', num_val=10, val_total=40, num_classes=10, model_classes=1000)]
    rs = loaded(*[result(seed=i, **k) for i, k in enumerate(kinds)])
    _, warnings = table.build_rows(table.load_paper(), rs, include=frozenset())
    counts = warnings[0].partition('with the paper (')[2].partition('):')[0]
    assert counts == '1 demo+random+subset, 1 demo+random+subset+classes, 1 eval-none, 1 subset'
    assert sum(int(c.split()[0]) for c in counts.split(', ')) == 4


def test_include_all_adds_no_rows_for_cells_that_never_ran():
    """A random-weight --eval fp demo of deit_tiny is one row of its own, not the paper's W4/A4 and W6/A6 rows
    of a variant that never ran; an --eval fp run of the published setting still fills the paper rows."""
    demo_fp = fp_result('deit_tiny_patch16_224', model='deit_tiny', fp=10.0, demo=True, weights='random')
    rows, _ = table.build_rows(table.load_paper(), loaded(demo_fp), only_results=True, include=table.ALL)
    assert [(r['model'], r['bits'], r['fp'], r['note']) for r in rows] == [('DeiT-T', '', 10.0, 'random weights; demo')]
    rows, _ = table.build_rows(table.load_paper(), loaded(fp_result()), only_results=True, include=table.ALL)
    assert [(r['model'], r['bits']) for r in rows] == [('DeiT-S', 'W4/A4'), ('DeiT-S', 'W6/A6')]


def test_the_files_make_table_writes_by_default_are_ignored_by_git():
    if subprocess.run(['git', '-C', ROOT, 'rev-parse'], capture_output=True).returncode != 0:
        pytest.skip('not a git checkout')
    names = [f'results_table.{ext}' for ext in ('md', 'csv', 'png')]
    p = subprocess.run(['git', '-C', ROOT, 'check-ignore', *names], capture_output=True, text=True)
    assert p.stdout.split() == names
