"""The results table's QwT* columns (issue 28): the paper's fine-tuned figures merged into their rows, ours as
mean ± std over seeds beside them with the delta, shown only where a run fine-tuned; QwT* runs of another length
than one full epoch are variants of their own."""
import os

import pytest

from tests.test_table import loaded, result, row_of
from utils.core.errors import UserError
from utils.table import results as table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def star(qwtstar, epochs=1, max_images=None, repq=58.0, qwt=61.0, **kw):
    """A deit_tiny W4/A4 result.json of a QwT* run."""
    return result('deit_tiny_patch16_224', model='deit_tiny', repq=repq, qwt=qwt, qwtstar_top1=qwtstar,
                  qwtstar_top5=85.0, finetune={'recipe': {'epochs': epochs, 'max_images': max_images}, 'steps': 10},
                  **kw)


def test_the_paper_qwtstar_figures_join_their_rows():
    paper = table.load_paper()
    stars = {(p['model'], p['bits']): p['qwtstar_top1'] for p in paper if p.get('qwtstar_top1') is not None}
    assert stars == {('deit_tiny', 'W4/A4'): 64.8, ('swin_tiny', 'W4/A4'): 79.3, ('vit_base', 'W4/A4'): 78.5}
    assert len(paper) == 26  # merged, not appended
    assert table.load_paper(table.PAPER_CSV)[0].get('qwtstar_top1') is None  # the RepQ-ViT CSV alone has none


def test_qwtstar_columns_mean_std_and_delta():
    rows, _ = table.build_rows(table.load_paper(), loaded(star(65.0), star(66.0, seed=1)), only_results=True)
    r = row_of(rows, 'DeiT-T', 'W4/A4')
    assert (r['paper_qwtstar'], r['qwtstar'], r['qwtstar_n']) == (64.8, 65.5, 2)
    assert r['qwtstar_std'] == pytest.approx(0.7071, abs=1e-4)  # sqrt(((65-65.5)^2 + (66-65.5)^2) / 1)
    assert r['delta_qwtstar'] == pytest.approx(0.7)
    lines = table.to_markdown(rows).splitlines()
    assert lines[0] == ('| model | bits | FP (paper) | FP (this project) | RepQ-ViT (paper) | RepQ-ViT + QwT (paper) | '
                        'RepQ-ViT + QwT* (paper) | RepQ-ViT (this project) | RepQ-ViT + QwT (this project) | '
                        'RepQ-ViT + QwT* (this project) | Δ FP | Δ RepQ-ViT | Δ QwT | Δ QwT* | n | note |')
    assert lines[1] == '|' + '---|' * 16
    assert lines[2] == ('| DeiT-T | W4/A4 | 72.2 |  | 58.2 | 61.4 | 64.8 | 58.00 ± 0.00 | 61.00 ± 0.00 | 65.50 ± 0.71 |  | -0.20 | '
                        '-0.40 | +0.70 | 2 |  |')


def test_no_qwtstar_run_no_qwtstar_columns():
    rows, _ = table.build_rows(table.load_paper(), loaded(result()), only_results=True)
    assert 'QwT*' not in table.to_markdown(rows)
    assert row_of(rows, 'DeiT-S', 'W4/A4')['qwtstar_n'] == 0


def test_a_shorter_or_longer_qwtstar_is_a_variant_row():
    rows, _ = table.build_rows(table.load_paper(), loaded(star(65.0), star(60.0, max_images=512),
                                                          star(67.0, epochs=2)), only_results=True)
    assert row_of(rows, 'DeiT-T', 'W4/A4')['qwtstar'] == 65.0
    assert row_of(rows, 'DeiT-T', 'W4/A4', 'QwT* 512 images/epoch')['qwtstar'] == 60.0
    assert row_of(rows, 'DeiT-T', 'W4/A4', 'QwT* 2 epochs')['qwtstar'] == 67.0


def test_a_qwtstar_only_run_is_not_eval_none_and_a_bad_value_is_refused(tmp_path):
    assert 'eval-none' not in table.categories(star(65.0, repq=None, qwt=None))
    assert 'eval-none' in table.categories(star(None, repq=None, qwt=None))
    from tests.test_table import write_result
    path = write_result(str(tmp_path / 'bad'), star('65'))
    with pytest.raises(UserError, match=r"qwtstar_top1 is '65', expected a number or null"):
        table.load_results([path])
