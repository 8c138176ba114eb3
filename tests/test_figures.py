"""Figures: results_table.png (published vs this project, per model, both bit widths, seed error bars) and
r2.png (r² of every QwT block) are valid PNG files of the expected size; without matplotlib nothing is
drawn and one line says how to get them."""
import json
import os
import sys

import pytest
from PIL import Image

from utils.table import figures

from utils.table import results as table


def results(seeds=(0, 1, 2)):
    """A result per table model, bit width and seed, and an FP result per model."""
    out = []
    for p in table.load_paper(table.PAPER_CSV):
        w = int(p['bits'][1])
        for s in seeds:
            out.append({'model': p['model'], 'timm_name': p['timm_name'], 'w_bits': w, 'a_bits': w, 'eval': 'both',
                        'seed': s, 'repq_top1': p['repq_vit_top1'] - 1 + s, 'qwt_top1': p['repq_vit_qwt_top1'] - s,
                        'num_val': 50000, 'val_total': 50000, 'path': f"{p['model']}/{w}/{s}"})
        if w == 4:
            out.append({'model': p['model'], 'timm_name': p['timm_name'], 'w_bits': 4, 'a_bits': 4, 'eval': 'fp',
                        'seed': 0, 'fp_top1': p['fp_top1'] + 0.1, 'path': f"{p['model']}/fp"})
    return out


def r2_result(n=12):
    return {'model': 'deit_small', 'w_bits': 4, 'a_bits': 4, 'seed': 1,
            'qwt_blocks': [{'block': i, 'r2': [0.9, 0.4, -0.3, None, -5.0][i % 5], 'used': i % 5 < 2,
                            'fallback': 'lstsq' if i == 7 else None} for i in range(n)]}


def check_png(path, size):
    with Image.open(path) as im:
        assert im.format == 'PNG' and im.size == size
        im = im.convert('RGB')
        assert len(im.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # drawn, not blank


def test_results_and_r2_png(tmp_path):
    pytest.importorskip('matplotlib')
    rows, _ = table.build_rows(table.load_paper(table.PAPER_CSV), results())
    assert len(rows) == 20 and rows[0]['repq_std'] == pytest.approx(1.0)
    assert figures.results_figure(rows, str(tmp_path / 'results_table.png')) is True
    check_png(tmp_path / 'results_table.png', (1700, 695))  # 5 x 2 panels of 3.4 x 3 in, title and legend, 100 dpi
    assert figures.r2_figure(r2_result(), str(tmp_path / 'r2.png')) is True
    check_png(tmp_path / 'r2.png', (620, 320))  # 0.35 in per block + 2 in, 3.2 in high
    one, _ = table.build_rows(table.load_paper(), results(seeds=(0,))[:1], only_results=True)
    assert figures.results_figure(one, str(tmp_path / 'one.png'))
    check_png(tmp_path / 'one.png', (700, 420))  # one panel: the 7 in minimum width, a 2-row legend
    assert sorted(os.listdir(tmp_path)) == ['one.png', 'r2.png', 'results_table.png']  # no temporary files left


def test_without_matplotlib_the_tables_are_written_and_one_line_says_why_no_figures(tmp_path, monkeypatch, capsys):
    for name in ('matplotlib', 'matplotlib.figure', 'matplotlib.backends', 'matplotlib.backends.backend_agg'):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    assert figures.have_matplotlib() is False
    rows, _ = table.build_rows(table.load_paper(table.PAPER_CSV), results())
    assert figures.results_figure(rows, str(tmp_path / 'x.png')) is False
    assert figures.r2_figure(r2_result(), str(tmp_path / 'r2.png')) is False
    assert os.listdir(tmp_path) == []

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
    try:
        import make_table
    finally:
        sys.path.pop(0)
    run = tmp_path / 'run'
    os.makedirs(run)
    r = dict(results()[0])
    r.pop('path')
    (run / 'result.json').write_text(json.dumps(r))
    make_table.main([str(run), '--output', str(tmp_path / 't'), '--r2'])
    err = capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ['run', 't.csv', 't.md']
    assert err.splitlines()[-2:] == [f"wrote {tmp_path / 't.md'}, {tmp_path / 't.csv'}",
                                     'figures not written: matplotlib is not installed (pip install matplotlib)']


def test_r2_png_tells_a_singular_fit_from_one_that_did_not_help(tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    from matplotlib.colors import to_hex
    saved = []
    monkeypatch.setattr(figures, '_save', lambda fig, path: saved.append(fig))
    blocks = [{'block': 0, 'r2': -1100.2, 'used': False, 'fallback': None, 'singular': True, 'rank': 49,
               'unknowns': 97, 'condition': 4e15},
              {'block': 1, 'r2': -0.001, 'used': False, 'fallback': None, 'singular': False},
              {'block': 2, 'r2': 0.6, 'used': True, 'fallback': None, 'singular': False}]
    assert figures.r2_figure({'model': 'swin_tiny', 'w_bits': 4, 'a_bits': 4, 'seed': 0, 'qwt_blocks': blocks},
                             str(tmp_path / 'r2.png'))
    ax = saved[0].axes[0]
    assert [to_hex(p.get_facecolor()) for p in ax.patches] == ['#fcbba1', '#bdbdbd', '#3182bd']
    assert [(t.get_text(), t.get_position()[0]) for t in ax.texts if t.get_text() == '!'] == [('!', 0)]
    assert [line.get_xdata()[0] for line in ax.lines if line.get_marker() == 'x'] == [1]
    assert '1 of 3 blocks compensated, 1 left out for a singular fit' in ax.get_title()
