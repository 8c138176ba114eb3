"""ImageNet's val/ arrives flat (50,000 files ILSVRC2012_val_00000001.JPEG ...); the scripts need it in
the 1000 synset folders train/ already has. The labels come from the ILSVRC2012 devkit (the ground
truth of each val image, and meta.mat for the synset of each label) or from Kaggle's
LOC_val_solution.csv."""
import csv
import os
import shutil
import tarfile
import tempfile

from utils.core.errors import UserError

GROUND_TRUTH = 'ILSVRC2012_validation_ground_truth.txt'


def kaggle_labels(path):
    """{image id: synset} from LOC_val_solution.csv ('ImageId,PredictionString', the synset first)."""
    expected = "expected Kaggle's LOC_val_solution.csv (a text CSV with the columns ImageId,PredictionString)"
    try:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            if not {'ImageId', 'PredictionString'} <= set(reader.fieldnames or ()):
                raise UserError(f"{path}: {expected}")
            return {row['ImageId']: row['PredictionString'].split()[0] for row in reader}
    except (UnicodeDecodeError, csv.Error) as e:  # a binary file, the devkit or an archive passed by mistake
        raise UserError(f"{path} is not a text CSV ({type(e).__name__}): {expected}") from None
    except (AttributeError, IndexError):  # a row without its PredictionString
        raise UserError(f"{path}: a row has no synset in PredictionString: {expected}") from None


def devkit_labels(devkit):
    """{image id: synset} from the ILSVRC2012 devkit (its folder or ILSVRC2012_devkit_t12.tar.gz): line i of
    the validation ground truth is the ILSVRC2012_ID of ILSVRC2012_val_<i>; meta.mat maps IDs to synsets
    (its leaf synsets, those without children, are the 1000 classes)."""
    if os.path.isfile(devkit) and tarfile.is_tarfile(devkit):
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(devkit) as tar:
                tar.extractall(tmp, filter='data')
            return devkit_labels(tmp)
    found = {name: os.path.join(d, name) for d, _, files in os.walk(devkit) for name in files
             if name in ('meta.mat', GROUND_TRUTH)}
    if len(found) < 2:
        raise UserError(f"{devkit}: no data/meta.mat and data/{GROUND_TRUTH} in it: pass the ILSVRC2012 devkit "
                        "(ILSVRC2012_devkit_t12.tar.gz or its folder)")
    from scipy import io
    synsets = io.loadmat(found['meta.mat'], squeeze_me=True)['synsets']
    wnid_of = {int(s['ILSVRC2012_ID']): str(s['WNID']) for s in synsets if int(s['num_children']) == 0}
    with open(found[GROUND_TRUTH]) as f:
        ids = [int(line) for line in f if line.strip()]
    return {f'ILSVRC2012_val_{i:08d}': wnid_of[label] for i, label in enumerate(ids, start=1)}


def sort_val(val_dir, labels, copy=False):
    """Move (or copy) every labelled file of the flat ``val_dir`` into ``val_dir/<synset>/``. Returns
    (images sorted, number of synset folders). Files already in a synset folder are left alone."""
    flat = sorted(e.name for e in os.scandir(val_dir) if e.is_file())
    missing = [f for f in flat if os.path.splitext(f)[0] not in labels]
    if missing:
        raise UserError(f"{len(missing)} file(s) of {val_dir} have no label, e.g. {missing[0]}: are the labels "
                        "those of the ILSVRC2012 val split?")
    for f in flat:
        folder = os.path.join(val_dir, labels[os.path.splitext(f)[0]])
        os.makedirs(folder, exist_ok=True)
        (shutil.copy2 if copy else shutil.move)(os.path.join(val_dir, f), os.path.join(folder, f))
    return len(flat), sum(e.is_dir() for e in os.scandir(val_dir))
