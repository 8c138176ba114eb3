"""A run on a folder with fewer classes than the model (--allow_class_subset) says so in result.json, and the
results table never shows it as a plain row (tools/make_table.py)."""
import json

from conftest import TINY_CLASSES, save_random_checkpoint
from tools import make_table
from utils.run import cli
from utils.run.demo import make_image_folder


def test_a_class_subset_run_is_recorded_and_kept_out_of_the_comparison(tmp_path, capsys):
    root = make_image_folder(str(tmp_path / 'data'), classes=10, train_per_class=2, val_per_class=1, size=(16, 16))
    ckpt = save_random_checkpoint('vit_test_tiny', str(tmp_path / 'tiny.pth'))
    out = tmp_path / 'runs' / 'tiny'
    cli.main('vit', ['--model', 'vit_test_tiny', '--data_dir', root, '--checkpoint', ckpt, '--allow_class_subset',
                     '--batch_size', '4', '--qwt_samples', '8', '--num_workers', '0', '--eval_workers', '0',
                     '--device', 'cpu', '--output_dir', str(out)])
    r = json.load(open(out / 'result.json'))
    assert (r['num_classes'], r['train_classes'], r['model_classes'], r['allow_class_subset']) == \
        (10, 10, TINY_CLASSES, True)
    assert (r['num_val'], r['val_total']) == (10, 10)
    capsys.readouterr()

    make_table.main([str(tmp_path / 'runs'), '--only-results', '--output', str(tmp_path / 'plain')])
    captured = capsys.readouterr()
    assert 'vit_test_tiny' not in captured.out and len(captured.out.splitlines()) == 2  # the header alone
    assert f'left out 1 run(s) not comparable with the paper (1 classes): {out / "result.json"}; add them with ' \
           '--include classes' in captured.err
    make_table.main([str(tmp_path / 'runs'), '--only-results', '--include', 'classes', '--output',
                     str(tmp_path / 'marked')])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith('| vit_test_tiny | W4/A4 |')
    assert rows[0].endswith(f'| 1 | 10/{TINY_CLASSES} classes; 4 calibration images; 8 QwT images |')
