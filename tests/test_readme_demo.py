"""The README's demo table and the figures it quotes hold for fresh runs of the demos on any x86-64 CPU
(tools/readme_figures.py writes them; a run here, one per demo and per sentence, checks them; nothing skips):
the demo pins its CPU kernels before torch loads (utils.core.cpu_numerics), so restricting the kernels further
(AVX2 only, or no vector instructions at all) changes no figure. And what a demo run says about itself: its
thread count and kernels pinned whatever the machine, where its result.json went, no temporary folder recorded
as its data."""
import json
import os

import pytest

from demo_batch import run_demos
from tools import readme_figures as rf
from utils.core.cpu_numerics import PIN
from utils.run.demo import DEMO_THREADS

README = open(rf.README).read()
# Other machines, as far as one machine can play them: the kernels of a CPU with AVX2 and no AVX512, and of
# one without vector instructions (ATen, oneDNN and MKL each capped). The pin must give the same figures.
RESTRICTED = {
    'avx2': {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2'},
    'none': {'ATEN_CPU_CAPABILITY': 'default', 'ONEDNN_MAX_CPU_ISA': 'SSE41', 'MKL_ENABLE_INSTRUCTIONS': 'SSE4_2'},
}
# Each demo of the table runs under one of them (both kinds covered), while tools/readme_figures.py wrote the
# README's rows with every kernel the machine has: rows equal to the README's show that the pin holds.
RESTRICT = {'vit': 'none', 'swin': 'avx2', 'resnet': 'none'}


def _runs(tmp, demos, env):
    return {d.key: (d, *rf.run_demo(d, str(tmp / d.key), env=env), str(tmp / d.key)) for d in demos}


@pytest.fixture(scope='module')
def demo_runs(tmp_path_factory):
    """Each demo of tools/readme_figures.DEMOS and EXTRA once, as a user runs it, on two threads if the machine
    lets it (the demo pins its own), with an empty torch hub (nothing may be downloaded); the DEMOS as fresh
    processes with the CPU kernels restricted further (RESTRICT)."""
    tmp = tmp_path_factory.mktemp('demos')
    env = {'OMP_NUM_THREADS': '2', 'TORCH_HOME': str(tmp / 'torch')}
    runs = {}
    for d in rf.DEMOS:
        runs.update(_runs(tmp, (d,), {**env, **RESTRICTED[RESTRICT[d.key]]}))
    runs.update(_runs(tmp, [d for d in rf.EXTRA if d.procs > 1], env))
    # the sentences' one-process runs in one batch (tests/demo_batch.py: their imports once)
    batch = run_demos([d for d in rf.EXTRA if d.procs == 1], str(tmp), env)
    runs.update({d.key: (d, *batch[d.key]) for d in rf.EXTRA if d.procs == 1})
    assert not os.path.exists(tmp / 'torch')  # nothing was downloaded
    return runs


def _extra(demo_runs):
    return {key: run[1] for key, run in demo_runs.items()}


@pytest.mark.slow
def test_readme_demo_rows_are_those_of_fresh_runs_within_their_time_bounds(demo_runs):
    table = rf.read_block(README, 'demo_table')
    assert table is not None, 'README.md has no <!-- readme_figures:demo_table --> block'
    readme_rows = table.splitlines()
    assert tuple(readme_rows[:2]) == rf.TABLE_HEADER and len(readme_rows) == 2 + len(rf.DEMOS)
    for demo, row in zip(rf.DEMOS, readme_rows[2:]):
        _, r, cpu, *_ = demo_runs[demo.key]
        assert rf.without_time(row) == rf.table_row(demo, r)
        assert cpu <= rf.row_bound(row), (demo.command, cpu, row)


@pytest.mark.slow
def test_readme_figures_and_sentences_are_those_of_fresh_runs(demo_runs):
    """Every other block tools/readme_figures.py writes: the sentences under the table, the other settings,
    the ResNet section's demo, two processes (the --ptq table: test_readme_method_table_rows_of_the_default_methods
    and tests/test_ptq_demos.py)."""
    fresh = rf.blocks([(d, demo_runs[d.key][1], demo_runs[d.key][2]) for d in rf.DEMOS], _extra(demo_runs))
    for name, text in fresh.items():
        if name not in ('demo_table', 'ptq_table'):  # the table: above; the --ptq table: its two tests
            assert rf.read_block(README, name) == text, name


@pytest.mark.slow
def test_restricting_the_cpu_kernels_further_changes_no_figure(demo_runs):
    """The table's demos ran with the kernels restricted further (RESTRICT; tools/readme_figures.py ran them with
    all the machine's kernels): every figure of their rows as in the README's demo table, and the pin named in
    their logs."""
    table = rf.read_block(README, 'demo_table').splitlines()[2:]
    assert set(RESTRICT) == {d.key for d in rf.DEMOS}
    for demo, row in zip(rf.DEMOS, table):
        _, r, _, stdout, _ = demo_runs[demo.key]
        assert rf.without_time(row) == rf.table_row(demo, r), (demo.command, RESTRICT[demo.key])
        assert all(r[k] is not None for k in ('fp_top5', 'ptq_top5', 'qwt_top5', 'qwtstar_top5'))
        assert 'DEFAULT kernels (ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE' in stdout


@pytest.mark.slow
def test_readme_method_table_rows_of_the_default_methods(demo_runs):
    """The --ptq table's RepQ-ViT and Percentile rows are the plain demos' (the brevitas rows:
    tests/test_ptq_demos.py)."""
    from utils.run.ptq import DEFAULTS
    block = rf.read_block(README, 'ptq_table')
    assert block is not None, 'README.md has no <!-- readme_figures:ptq_table --> block'
    defaults = [ln for ln in rf.ptq_rows(block) if ln.split(' | ')[0][2:] in {f'`{n}`' for n in DEFAULTS.values()}]
    fresh = [rf.ptq_row(name, d, demo_runs[d.key][1]) for name, d in rf.ptq_demos() if name in DEFAULTS.values()]
    assert defaults == fresh and len(fresh) == 3


def test_no_hoped_for_claims_left_in_the_readme():
    assert 'it keeps\nits accuracy at W3/A3' not in README and 'keeps its accuracy at W3/A3' not in README
    assert '`--qwt_solver lstsq` does)' not in README
    assert '186 s' not in README and '0.4311' not in README and 'The images are the same' not in README
    assert 'AVX512 kernels' not in README and "On this repository's 2-core CPU:" not in README


@pytest.mark.slow
def test_the_demo_pins_its_threads_and_kernels_and_says_where_its_result_went(demo_runs):
    settings = ', '.join(f'{name}={value}' for name, value in PIN)
    for demo, r, _, stdout, out in demo_runs.values():
        if demo.procs == 1:
            assert (f'demo: {DEMO_THREADS} CPU thread(s), DEFAULT kernels ({settings}): the same figures on every '
                    'x86-64 CPU') in stdout, demo.key
            assert f"wrote {os.path.join(out, 'result.json')} (and the log {os.path.join(out, 'log.txt')})" in stdout
        assert r['numerics']['cpu_threads'] == DEMO_THREADS
        assert r['demo'] and r['data_dir'] is None  # its generated folder is gone after the run
        assert (r['num_classes'], r['model_classes'], r['allow_class_subset']) == (10, 10, False)
        assert json.load(open(os.path.join(out, 'result.json'))) == r


@pytest.mark.slow
def test_the_resnet_demo_says_the_bits_that_run(demo_runs):
    """Its convolutions read 8-bit inputs as published: the plain demo is W2/A8, and the demo table's row at real
    3-bit conv inputs has the flags in its command line and an output folder of its own."""
    _, r, _, stdout, out = demo_runs['resnet_plain']
    assert (r['w_bits'], r['a_bits'], r['conv_a_bits'], r['factor']) == (2, 8, '8', 32)
    assert 'at W2/A8' in stdout
    assert (r['method'], r['eval'], r['num_val'], r['num_calib'], r['num_qwt'], len(r['qwt_blocks'])) == (
        'Percentile', 'all', 500, 32, 256, 3)
    assert r['fp_top1'] == 99.6 and r['ptq_top1'] < r['fp_top1'] - 2 and r['qwt_top1'] > r['ptq_top1']
    assert 'Percentile + QwT top-1' in stdout and 'RepQ-ViT' not in stdout
    low_demo, low, *_ = demo_runs['resnet']
    assert (low['w_bits'], low['a_bits'], low['conv_a_bits']) == (2, 3, 'a_bits')
    assert '--conv_a_bits a_bits --a_bits 3' in low_demo.command and rf.bits(low) == 'W2/A3'
    assert (low['ptq_top1'], low['qwt_top1']) != (r['ptq_top1'], r['qwt_top1'])  # 3-bit inputs change the model


@pytest.mark.slow
def test_qwtstar_demos_beat_qwt(demo_runs):
    """Each demo fine-tunes (QwT*, tools/readme_figures.FINETUNE) and ends above its closed-form QwT, with the
    fine-tuning recorded: two epochs of the 1,297 training digits in whole batches of 32."""
    for demo in rf.DEMOS:
        r = demo_runs[demo.key][1]
        assert r['qwtstar_top1'] > r['qwt_top1'], (demo.key, r['qwt_top1'], r['qwtstar_top1'])
        assert r['finetune']['recipe']['epochs'] == 2 and r['finetune']['steps'] == 2 * (1297 // 32)
        assert r['finetune']['images_seen'] == 2 * (1297 // 32) * 32 and r['finetune']['resumed_from'] is None


@pytest.mark.slow
def test_swin_demo_recovers_accuracy_and_leaves_block0_out(demo_runs):
    """swin_digits, trained on the UCI digits, at W3/A3 on a folder of the digits: FP, RepQ-ViT and RepQ-ViT +
    QwT on the 500 held-out digits, QwT above RepQ-ViT; block 0's singular fit is one warning and left out, as
    published."""
    _, r, _, stdout, _ = demo_runs['swin']
    assert (r['model'], r['weights'], r['eval'], r['w_bits'], r['a_bits']) == ('swin_digits', 'pretrained', 'all', 3, 3)
    assert (r['num_val'], r['num_calib'], r['num_qwt']) == (500, 32, 256)
    assert r['fp_top1'] == 94.4  # 472 of 500: the model as trained (tests/test_digits.py)
    assert r['qwt_top1'] > r['ptq_top1'] and r['ptq_top1'] < r['fp_top1'] - 2
    assert r['qwt_blocks'][0]['singular'] and not r['qwt_blocks'][0]['used']
    assert 'demo: swin_digits, trained on the UCI handwritten digits (models/digits), at W3/A3' in stdout
    assert stdout.count('is numerically singular') == 1 and '--qwt_solver lstsq fits it' in stdout
    assert 'QwT: 3 of 4 blocks compensated, 1 left out (1 for a numerically singular fit: block 0;' in stdout


def test_the_demo_table_takes_a_new_demo_by_one_entry():
    """The generator is generic over DEMOS: a row per entry, its command from the entry."""
    demo = rf.Demo('resnet', 'qwt_resnet.py')
    r = {'model': 'resnet_digits', 'w_bits': 4, 'a_bits': 4, 'fp_top1': 97.0, 'ptq_top1': 90.25, 'qwt_top1': 95.5,
         'versions': {'torch': '2.14.1+cpu'}}
    assert rf.table_row(demo, r, 20) == \
        '| `python qwt_resnet.py --demo` | `resnet_digits` | W4/A4 | 97.00 | 90.25 | 95.50 |  | < 20 s |'
    assert rf.table_row(demo, dict(r, qwtstar_top1=96.0)) == \
        '| `python qwt_resnet.py --demo` | `resnet_digits` | W4/A4 | 97.00 | 90.25 | 95.50 | 96.00 |  |'
    assert rf.table_row(demo, dict(r, conv_a_bits='8'), 20).split(' | ')[2] == 'W4/A8'
    assert rf.without_time(rf.table_row(demo, r, 20)) == rf.table_row(demo, r)
    assert rf.row_bound(rf.table_row(demo, r, 20)) == 20 and rf.time_bound(12.4) == 20 and rf.time_bound(14) == 30
    text = rf.figures_text([(demo, dict(r, qwt_size_mb=0.5, ptq_size_mb=0.25, num_qwt=256))] * 2)
    assert 'loses 6.75 (`resnet_digits`) and 6.75 (`resnet_digits`) points' in text
    assert 'gives back 5.25 and 5.25 of them for 0.25 and 0.25 MB' in text and 'torch 2.14.1;' in text
    assert rf.Demo('v', 'qwt_vit_and_deit.py', procs=2).command == 'torchrun --nproc_per_node 2 qwt_vit_and_deit.py --demo'
