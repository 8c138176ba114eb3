"""The README's demo table and the figures it quotes hold for fresh runs of the demos (tools/readme_figures.py
writes them; a run here, one per demo, checks them), and what a demo run says about itself: its thread count
pinned whatever the cores, where its result.json went, no temporary folder recorded as its data."""
import json
import os

import pytest
import torch

from tools import readme_figures as rf
from utils.run.demo import DEMO_THREADS

README = open(rf.README).read()


@pytest.fixture(scope='module')
def demo_runs(tmp_path_factory):
    """Each demo of tools/readme_figures.DEMOS once, as a user runs it, on two threads if the machine lets it
    (the demo pins its own), with an empty torch hub (nothing may be downloaded)."""
    tmp = tmp_path_factory.mktemp('demos')
    env = {'OMP_NUM_THREADS': '2', 'TORCH_HOME': str(tmp / 'torch')}
    runs = {d.key: (d, *rf.run_demo(d, str(tmp / d.key), env=env), str(tmp / d.key)) for d in rf.DEMOS}
    assert not os.path.exists(tmp / 'torch')  # nothing was downloaded
    return runs


def _same_kernels():
    figures = rf.read_block(README, 'demo_figures') or ''
    if f'{torch.backends.cpu.get_cpu_capability()} kernels' not in figures:
        pytest.skip(f'the README\'s demo figures were measured with other CPU kernels than '
                    f'{torch.backends.cpu.get_cpu_capability()}: {figures[:120]!r}')


def test_readme_demo_rows_are_those_of_fresh_runs(demo_runs):
    table = rf.read_block(README, 'demo_table')
    assert table is not None, 'README.md has no <!-- readme_figures:demo_table --> block'
    _same_kernels()
    readme_rows = table.splitlines()
    assert tuple(readme_rows[:2]) == rf.TABLE_HEADER
    fresh = [rf.table_row(d, r) for d, r, *_ in demo_runs.values()]
    assert [rf.without_time(row) for row in readme_rows[2:]] == fresh


def test_readme_demo_figures_are_those_of_fresh_runs(demo_runs):
    _same_kernels()
    fresh = rf.figures_text([(d, r) for d, r, *_ in demo_runs.values()], DEMO_THREADS,
                            torch.backends.cpu.get_cpu_capability(), torch.__version__.split('+')[0])
    assert rf.read_block(README, 'demo_figures') == fresh


def test_no_hoped_for_claims_left_in_the_readme():
    assert 'it keeps\nits accuracy at W3/A3' not in README and 'keeps its accuracy at W3/A3' not in README
    assert '`--qwt_solver lstsq` does)' not in README
    assert '186 s' not in README and '0.4311' not in README and 'The images are the same' not in README


def test_the_demo_pins_its_threads_and_says_where_its_result_went(demo_runs):
    for demo, r, _, stdout, out in demo_runs.values():
        assert (f'demo: {DEMO_THREADS} CPU thread(s), {torch.backends.cpu.get_cpu_capability()} kernels (the '
                f"README's demo table holds for {DEMO_THREADS} thread") in stdout, demo.key
        assert f"wrote {os.path.join(out, 'result.json')} (and the log {os.path.join(out, 'log.txt')})" in stdout
        assert r['demo'] and r['data_dir'] is None  # its generated folder is gone after the run
        assert (r['num_classes'], r['model_classes'], r['allow_class_subset']) == (10, 10, False)
        assert json.load(open(os.path.join(out, 'result.json'))) == r


def test_qwtstar_demos_beat_qwt(demo_runs):
    """Each demo fine-tunes (QwT*, tools/readme_figures.FINETUNE) and ends above its closed-form QwT, with the
    fine-tuning recorded: one epoch of the 1,297 training digits in whole batches of 32."""
    for demo, r, *_ in demo_runs.values():
        assert r['qwtstar_top1'] > r['qwt_top1'], (demo.key, r['qwt_top1'], r['qwtstar_top1'])
        assert r['finetune']['recipe']['epochs'] == 1 and r['finetune']['steps'] == 1297 // 32
        assert r['finetune']['images_seen'] == 1297 // 32 * 32 and r['finetune']['resumed_from'] is None


def test_swin_demo_recovers_accuracy_and_leaves_block0_out(demo_runs):
    """swin_digits, trained on the UCI digits, at W3/A3 on a folder of the digits: FP, RepQ-ViT and RepQ-ViT +
    QwT on the 500 held-out digits, QwT above RepQ-ViT; block 0's singular fit is one warning and left out, as
    published."""
    _, r, _, stdout, _ = demo_runs['swin']
    assert (r['model'], r['weights'], r['eval'], r['w_bits'], r['a_bits']) == ('swin_digits', 'pretrained', 'all', 3, 3)
    assert (r['num_val'], r['num_calib'], r['num_qwt']) == (500, 32, 256)
    assert r['fp_top1'] == 94.4  # 472 of 500: the model as trained (tests/test_digits.py)
    assert r['qwt_top1'] > r['repq_top1'] and r['repq_top1'] < r['fp_top1'] - 2
    assert r['qwt_blocks'][0]['singular'] and not r['qwt_blocks'][0]['used']
    assert 'demo: swin_digits, trained on the UCI handwritten digits (models/digits), at W3/A3' in stdout
    assert stdout.count('is numerically singular') == 1 and '--qwt_solver lstsq fits it' in stdout
    assert 'QwT: 3 of 4 blocks compensated, 1 left out (1 for a numerically singular fit: block 0;' in stdout


def test_the_demo_table_takes_a_new_demo_by_one_entry():
    """The generator is generic over DEMOS: a row per entry, its command from the entry."""
    demo = rf.Demo('resnet', 'qwt_resnet.py')
    r = {'model': 'resnet_digits', 'w_bits': 4, 'a_bits': 4, 'fp_top1': 97.0, 'repq_top1': 90.25, 'qwt_top1': 95.5}
    assert rf.table_row(demo, r, 12.4) == \
        '| `python qwt_resnet.py --demo` | `resnet_digits` | W4/A4 | 97.00 | 90.25 | 95.50 |  | 12 s |'
    assert rf.table_row(demo, dict(r, qwtstar_top1=96.0)) == \
        '| `python qwt_resnet.py --demo` | `resnet_digits` | W4/A4 | 97.00 | 90.25 | 95.50 | 96.00 |  |'
    assert rf.without_time(rf.table_row(demo, r, 12.4)) == rf.table_row(demo, r)
    text = rf.figures_text([(demo, dict(r, qwt_size_mb=0.5, repq_size_mb=0.25, num_qwt=256))] * 2, 1, 'AVX2', '2.14.1')
    assert 'loses 6.75 (`resnet_digits`) and 6.75 (`resnet_digits`) points' in text
    assert 'gives back 5.25 and 5.25 of them for 0.25 and 0.25 MB' in text and '1 CPU thread' in text
