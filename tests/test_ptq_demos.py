"""Every third-party --ptq method on each digits demo, run as a user runs it (``python SCRIPT --demo --ptq M``,
one run per method and demo, shared by the tests): result.json, the log and the table name the method, QwT gives
back a visible part of what the method loses on every family, and the README's method table holds these runs
(its default-method rows: tests/test_readme_demo.py)."""
import pytest

from demo_batch import run_demos
from tools import readme_figures as rf
from utils.run import ptq
from utils.table import results as table

README = open(rf.README).read()
pytestmark = pytest.mark.slow
FAMILY = {'qwt_vit_and_deit.py': 'vit', 'qwt_swin.py': 'swin', 'qwt_resnet.py': 'resnet'}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Each demo as ``python SCRIPT --demo --ptq M`` runs it, in one batch (tests/demo_batch.py: the imports,
    brevitas's among them, once)."""
    tmp = tmp_path_factory.mktemp('ptq_demos')
    demos = {d: name for name, d in rf.ptq_demos() if name not in ptq.DEFAULTS.values()}
    done = run_demos(demos, str(tmp), env={'OMP_NUM_THREADS': '2', 'TORCH_HOME': str(tmp / 'torch')})
    return {d.key: (name, d, done[d.key][0], done[d.key][2]) for d, name in demos.items()}


def test_every_third_party_method_runs_on_every_family(runs):
    wanted = {(n, FAMILY[d.script]) for n, m in ptq.METHODS.items() if m.fp_model for d in rf.DEMOS}
    assert {(name, FAMILY[d.script]) for name, d, _, _ in runs.values()} == wanted and len(wanted) == 6


def test_result_log_and_table_name_the_method(runs):
    for name, demo, r, stdout in runs.values():
        label = ptq.METHODS[name].label
        assert (r['ptq'], r['method'], r['eval']) == (name, label, 'all'), demo.key
        assert r['versions']['brevitas'] == '0.13.4'
        assert f'{label} + QwT top-1 {r["qwt_top1"]:.2f}' in stdout and f'{label} calibration done' in stdout
        assert r['ptq_size_mb'] < r['qwt_size_mb'] < r['fp_size_mb']
        rows, _ = table.build_rows(table.load_paper(), [dict(r, path='x')], only_results=True)
        assert [(row['method'], row['repq'], row['qwt'], row['paper_repq']) for row in rows] == [
            (label, r['ptq_top1'], r['qwt_top1'], None)]
        assert f"| {r['model']} | W{r['w_bits']}/A{r['a_bits']} |" in table.to_markdown(rows)
        assert f'| {label} (this project) |' in table.to_markdown(rows)


def test_qwt_gives_back_part_of_the_loss_on_every_family(runs):
    """Behind at least one brevitas method per family: the method loses > 1 point, QwT gives back >= 1."""
    for family in ('vit', 'swin', 'resnet'):
        gains = [(r['fp_top1'] - r['ptq_top1'], r['qwt_top1'] - r['ptq_top1'])
                 for _, d, r, _ in runs.values() if FAMILY[d.script] == family]
        assert any(lost > 1 and back >= 1 for lost, back in gains), (family, gains)


def test_readme_method_rows_are_those_of_fresh_runs(runs):
    block = rf.read_block(README, 'ptq_table')
    assert block is not None, 'README.md has no <!-- readme_figures:ptq_table --> block'
    assert tuple(block.splitlines()[:2]) == rf.PTQ_HEADER
    readme = [ln for ln in rf.ptq_rows(block) if ln.split(' | ')[0][2:] not in {f'`{n}`' for n in ptq.DEFAULTS.values()}]
    assert readme == [rf.ptq_row(name, d, r) for name, d, r, _ in runs.values()]
