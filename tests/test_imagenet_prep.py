"""tools/prepare_imagenet_val.py: the flat val/ sorted into synset folders from the devkit or Kaggle's csv."""
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from scipy import io

from tools import prepare_imagenet_val

# val image i (1-based) -> (ILSVRC2012_ID in the ground truth, synset)
TRUTH = {1: (2, 'n01443537'), 2: (1, 'n01440764'), 3: (2, 'n01443537'), 4: (3, 'n01484850')}
SYNSETS = [(1, 'n01440764', 0), (2, 'n01443537', 0), (3, 'n01484850', 0), (1001, 'n00001740', 3)]  # last: not a class


def flat_val(tmp_path):
    val = tmp_path / 'val'
    val.mkdir()
    for i in TRUTH:
        Image.new('RGB', (4, 4), (i, 0, 0)).save(val / f'ILSVRC2012_val_{i:08d}.JPEG')
    return val


def devkit(tmp_path):
    data = tmp_path / 'ILSVRC2012_devkit_t12' / 'data'
    data.mkdir(parents=True)
    fields = ['ILSVRC2012_ID', 'WNID', 'words', 'gloss', 'num_children', 'children', 'wordnet_height',
              'num_train_images']
    synsets = np.zeros((1, len(SYNSETS)), dtype=[(f, 'O') for f in fields])
    for j, (sid, wnid, children) in enumerate(SYNSETS):
        synsets[0, j] = (sid, wnid, 'words', 'gloss', children, np.zeros(children), 0, 1300)
    io.savemat(str(data / 'meta.mat'), {'synsets': synsets})
    (data / 'ILSVRC2012_validation_ground_truth.txt').write_text(''.join(f'{TRUTH[i][0]}\n' for i in sorted(TRUTH)))
    return tmp_path / 'ILSVRC2012_devkit_t12'


def check_sorted(val):
    for i, (_, wnid) in TRUTH.items():
        assert (val / wnid / f'ILSVRC2012_val_{i:08d}.JPEG').is_file()
    assert sorted(os.listdir(val)) == ['n01440764', 'n01443537', 'n01484850']


@pytest.mark.parametrize('packed', [False, True], ids=['folder', 'tar.gz'])
def test_devkit_labels_sort_val(tmp_path, capsys, packed):
    val, kit = flat_val(tmp_path), devkit(tmp_path)
    if packed:
        with tarfile.open(tmp_path / 'ILSVRC2012_devkit_t12.tar.gz', 'w:gz') as tar:
            tar.add(kit, arcname='ILSVRC2012_devkit_t12')
        kit = tmp_path / 'ILSVRC2012_devkit_t12.tar.gz'
    assert prepare_imagenet_val.main([str(val), '--devkit', str(kit)]) == (4, 3)
    check_sorted(val)
    assert capsys.readouterr().out == (f'4 images sorted; {val} holds 3 synset folders (ImageNet has 1000: the '
                                       'published accuracy needs all of them)\n')


def test_kaggle_labels_sort_val_and_copy_keeps_the_files(tmp_path):
    val = flat_val(tmp_path)
    rows = ''.join(f'ILSVRC2012_val_{i:08d},{wnid} 1 2 3 4 {wnid} 5 6 7 8\n' for i, (_, wnid) in TRUTH.items())
    (tmp_path / 'LOC_val_solution.csv').write_text('ImageId,PredictionString\n' + rows)
    prepare_imagenet_val.main([str(val), '--kaggle', str(tmp_path / 'LOC_val_solution.csv'), '--copy'])
    assert len([f for f in os.listdir(val) if f.endswith('.JPEG')]) == 4  # copied, not moved
    for i, (_, wnid) in TRUTH.items():
        assert (val / wnid / f'ILSVRC2012_val_{i:08d}.JPEG').read_bytes() == \
            (val / f'ILSVRC2012_val_{i:08d}.JPEG').read_bytes()


def test_unlabelled_file_is_an_error_and_nothing_moves(tmp_path, capsys):
    val = flat_val(tmp_path)
    Image.new('RGB', (4, 4)).save(val / 'holiday.JPEG')
    with pytest.raises(SystemExit) as exc:
        prepare_imagenet_val.main([str(val), '--devkit', str(devkit(tmp_path))])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f'error: 1 file(s) of {val} have no label, e.g. holiday.JPEG: are the labels '
                                       'those of the ILSVRC2012 val split?\n')
    assert len(os.listdir(val)) == 5


@pytest.mark.parametrize('content, why', [
    (bytes(range(128, 256)) * 4, ' is not a text CSV (UnicodeDecodeError): '),
    (b'ImageId,PredictionString\nILSVRC2012_val_00000001,\n', ': a row has no synset in PredictionString: '),
])
def test_kaggle_file_that_is_not_the_csv_is_one_line(tmp_path, capsys, content, why):
    val = flat_val(tmp_path)
    bad = tmp_path / 'not_a.csv'
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        prepare_imagenet_val.main([str(val), '--kaggle', str(bad)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"error: {bad}{why}expected Kaggle's LOC_val_solution.csv (a text CSV with "
                                       'the columns ImageId,PredictionString)\n')
    assert len(os.listdir(val)) == 4  # nothing moved
