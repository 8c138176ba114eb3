"""Data pieces of SPEC §1 (utils/run/data.py) and top-k counting (utils/run/evaluate.py)."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment
from torch.utils.data import TensorDataset
from torchvision import transforms as T

from utils.run import data
from utils.core.distributed import DistInfo
from utils.core.errors import ImageDecodeError, UserError
from utils.run.evaluate import evaluate, topk_correct

POSTERIZE_NAMES = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')


@pytest.fixture
def name_to_op(monkeypatch):
    """A private, unfixed copy of timm's op table, restored after the test (fix_posterize edits it in
    place, and any in-process pipeline run before this test has already applied it)."""
    table = {name: auto_augment.posterize if fn is data._posterize_zero_bits_black else fn
             for name, fn in auto_augment.NAME_TO_OP.items()}
    monkeypatch.setattr(auto_augment, 'NAME_TO_OP', table)
    return table


def _rgb(w=37, h=29, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'RGB')


def _pillow_rejects_zero_bits():
    try:
        ImageOps.posterize(_rgb(4, 4), 0)
    except ValueError:
        return True
    return False


def test_posterize_increasing_magnitude_10_gives_black_image(name_to_op):
    data.fix_posterize()
    op = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    assert auto_augment.LEVEL_TO_ARG['PosterizeIncreasing'](10, {}) == (0,)  # this really asks for 0 bits
    img = _rgb()
    out = op(img)
    assert out.size == img.size and out.mode == 'RGB'
    assert np.asarray(out).max() == 0
    assert np.asarray(img).max() > 0  # the input is untouched
    gray = img.convert('L')
    out_l = op(gray)
    assert out_l.mode == 'L' and out_l.size == gray.size and np.asarray(out_l).max() == 0


def test_unfixed_posterize_zero_bits_raises_on_this_pillow(name_to_op):
    if not _pillow_rejects_zero_bits():
        pytest.skip('this Pillow posterizes to 0 bits without complaint')
    with pytest.raises(ValueError, match='bits'):
        auto_augment.posterize(_rgb(), 0)
    op = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)  # built before the fix
    with pytest.raises(ValueError, match='bits'):
        op(_rgb())


def test_fix_routes_every_posterize_op(name_to_op):
    original = auto_augment.posterize
    assert all(name_to_op[n] is original for n in POSTERIZE_NAMES)
    data.fix_posterize()
    data.fix_posterize()  # idempotent
    fixed = {name_to_op[n] for n in POSTERIZE_NAMES}
    assert len(fixed) == 1 and original not in fixed
    untouched = {k: v for k, v in name_to_op.items() if k not in POSTERIZE_NAMES}
    assert all(v is not next(iter(fixed)) for v in untouched.values())
    assert auto_augment.posterize is original  # timm's module function itself is not replaced
    # 'Posterize' asks for 0 bits at magnitude 0.
    out = auto_augment.AugmentOp('Posterize', prob=1.0, magnitude=0)(_rgb())
    assert np.asarray(out).max() == 0


@pytest.mark.parametrize('bits', range(1, 9))
def test_fixed_posterize_matches_timm_for_1_to_8_bits(name_to_op, bits):
    data.fix_posterize()
    fixed = name_to_op['PosterizeIncreasing']
    img = _rgb(seed=bits)
    got = fixed(img, bits, fillcolor=(1, 2, 3), resample=3)
    want = auto_augment.posterize(img, bits)
    assert got.size == want.size and got.mode == want.mode
    assert np.array_equal(np.asarray(got), np.asarray(want))
    if bits == 8:
        assert np.array_equal(np.asarray(got), np.asarray(img))
    else:
        assert not np.array_equal(np.asarray(got), np.asarray(img))


def test_train_transform_uses_fixed_posterize(name_to_op):
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    tf = data.train_transform(mean, std)
    kinds = [type(t).__name__ for t in tf.transforms]
    assert kinds == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor',
                     'Normalize']
    rrc = tf.transforms[0]
    assert tuple(rrc.size) == (224, 224) and rrc.interpolation == Image.BICUBIC
    ra = tf.transforms[2]
    assert ra.num_layers == 2 and len(ra.ops) == len(auto_augment._RAND_INCREASING_TRANSFORMS)
    post = [op for op in ra.ops if op.level_fn is auto_augment._posterize_increasing_level_to_arg]
    assert len(post) == 1
    op = post[0]
    assert op.aug_fn is not auto_augment.posterize
    assert op.aug_fn is name_to_op['PosterizeIncreasing']
    img_mean = tuple(round(255 * m) for m in mean)
    for o in ra.ops:
        assert o.magnitude == 9 and o.magnitude_std == 0.5 and o.prob == 0.5
        assert o.hparams['translate_const'] == int(224 * 0.45)
        assert o.kwargs['fillcolor'] == img_mean and o.kwargs['resample'] == Image.BICUBIC
    # The op as RandAugment holds it, at the worst magnitude: a black image, no exception.
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    assert np.asarray(op(_rgb())).max() == 0
    torch.testing.assert_close(tf.transforms[4].mean, torch.tensor(mean))
    torch.manual_seed(0)
    np.random.seed(0)
    for seed in range(3):
        out = tf(_rgb(40, 30, seed=seed))
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32


@pytest.mark.parametrize('crop_pct,resize', [(0.875, 256), (0.9, 248)])
def test_eval_transform(crop_pct, resize):
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    tf = data.eval_transform(mean, std, crop_pct)
    assert [type(t) for t in tf.transforms] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    r, c = tf.transforms[0], tf.transforms[1]
    assert (r.size == resize) or (list(r.size) == [resize])
    assert r.interpolation == T.InterpolationMode.BICUBIC
    assert tuple(c.size) == (224, 224)
    torch.testing.assert_close(torch.as_tensor(tf.transforms[3].mean, dtype=torch.float32), torch.tensor(mean))
    out = tf(_rgb(300, 200))
    assert out.shape == (3, 224, 224)


def test_image_dataset_missing_split(tmp_path):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(UserError) as info:
        data.image_dataset(str(tmp_path), 'val')
    assert str(info.value) == f'val/ not found under {tmp_path} (expected {tmp_path}/val/<class>/*)'


def _save(path, seed=0, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    _rgb(*size, seed=seed).save(path, format='PNG' if path.suffix.lower() == '.png' else 'JPEG')


def test_natural_order_of_classes_and_files(tmp_path):
    """timm's natural_key of the path, as the published runs list files: x_2 before x_10, and class c2
    before c10 (torchvision's ImageFolder sorts both the other way)."""
    for cls in ('c10', 'c2'):
        for name in ('x_10.JPEG', 'x_2.JPEG', 'X_3.jpeg', 'x_1.png', 'x_20.JPG'):
            _save(tmp_path / 'val' / cls / name)
    ds = data.image_dataset(str(tmp_path), 'val')
    assert ds.classes == ['c2', 'c10']
    names = [ds.relpath(i) for i in range(len(ds))]
    assert names == [f'val/{c}/{f}' for c in ('c2', 'c10')
                     for f in ('x_1.png', 'x_2.JPEG', 'X_3.jpeg', 'x_10.JPEG', 'x_20.JPG')]
    assert [ds.parser.samples[i][1] for i in range(len(ds))] == [0] * 5 + [1] * 5
    img, target, used, note = ds[3]
    assert (target, used, note) == (0, 3, '') and img.size == (8, 8)


def test_only_timm_extensions_count(tmp_path):
    """.png .jpg .jpeg in any case; other files are not images (a .gif, a .txt, a .JPEG.bak)."""
    _save(tmp_path / 'val' / 'a' / 'ok.JPEG')
    for name in ('anim.gif', 'notes.txt', 'old.JPEG.bak'):
        (tmp_path / 'val' / 'a' / name).write_bytes(b'x')
    (tmp_path / 'val' / 'b').mkdir()
    (tmp_path / 'val' / 'b' / 'x.gif').write_bytes(b'x')
    with pytest.raises(UserError, match=r'no images in class folder\(s\) b of .*extensions .png .jpg .jpeg'):
        data.image_dataset(str(tmp_path), 'val')
    (tmp_path / 'val' / 'b' / 'x.gif').unlink()
    (tmp_path / 'val' / 'b').rmdir()
    ds = data.image_dataset(str(tmp_path), 'val')
    assert len(ds) == 1 and ds.relpath(0) == 'val/a/ok.JPEG'


def test_unreadable_image_is_skipped_as_timm_does_and_reported(tmp_path):
    for i in range(4):
        _save(tmp_path / 'train' / 'a' / f'{i}.JPEG', seed=i)
    (tmp_path / 'train' / 'a' / '1.JPEG').write_bytes(b'not a jpeg')
    (tmp_path / 'train' / 'a' / '2.JPEG').write_bytes(b'')
    ds = data.image_dataset(str(tmp_path), 'train')
    img, target, used, note = ds[1]  # 1 and 2 unreadable: timm returns index 3
    assert used == 3 and np.array_equal(np.asarray(img), np.asarray(Image.open(tmp_path / 'train' / 'a' / '3.JPEG')))
    lines = note.split('\n')
    assert [line.split('\t')[0] for line in lines] == ['train/a/1.JPEG', 'train/a/2.JPEG']
    assert lines[0].split('\t')[1].startswith('UnidentifiedImageError')
    assert ds[0][2:] == (0, '')
    log = data.ImageLog()
    batch = (None, None, torch.tensor([3, 0]), [note, ''])
    assert log.files(ds, batch) == ['train/a/3.JPEG', 'train/a/0.JPEG']
    log.note_skips([note])  # the same file skipped again is listed once
    assert log.skipped == ['train/a/1.JPEG', 'train/a/2.JPEG']


def test_unreadable_last_image_wraps_to_the_first(tmp_path):
    for i in range(3):
        _save(tmp_path / 'val' / 'a' / f'{i}.JPEG', seed=i)
    (tmp_path / 'val' / 'a' / '2.JPEG').write_bytes(b'bad')
    ds = data.image_dataset(str(tmp_path), 'val')
    assert ds[2][2] == 0 and ds[2][3].startswith('val/a/2.JPEG\t')


def test_unreadable_image_with_strict_images_is_an_error(tmp_path):
    _save(tmp_path / 'val' / 'a' / '0.JPEG')
    (tmp_path / 'val' / 'a' / '1.JPEG').write_bytes(b'not a jpeg')
    ds = data.image_dataset(str(tmp_path), 'val', strict=True)
    assert ds[0][2] == 0
    with pytest.raises(ImageDecodeError, match=r'^cannot decode image .*/val/a/1.JPEG \(UnidentifiedImageError: '):
        ds[1]


def test_fifty_unreadable_images_in_a_row_stop(tmp_path):
    for i in range(51):
        (tmp_path / 'val' / 'a').mkdir(parents=True, exist_ok=True)
        (tmp_path / 'val' / 'a' / f'{i}.JPEG').write_bytes(b'bad')
    _save(tmp_path / 'val' / 'a' / '51.JPEG')
    ds = data.image_dataset(str(tmp_path), 'val')
    assert ds[2][2] == 51  # 49 skips still reach a readable image
    with pytest.raises(ImageDecodeError, match='50 unreadable images in a row'):
        ds[1]


def test_train_loader_uses_distributed_sampler_defaults():
    """SPEC §1b: DistributedSampler(dataset) as constructed with no arguments: seed 0, shuffled, no
    set_epoch, so two iterations of the loader see one order."""
    ds = TensorDataset(torch.arange(40))
    for rank in (0, 1):
        loader = data.train_loader(ds, 4, 0, DistInfo(rank=rank, world_size=2))
        s = loader.sampler
        assert (s.seed, s.shuffle, s.epoch, s.num_replicas, s.rank, loader.drop_last) == (0, True, 0, 2, rank, True)
        first = [b[0].tolist() for b in loader]
        torch.manual_seed(123)
        assert [b[0].tolist() for b in loader] == first
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(40, generator=g).tolist()[rank::2]
        assert sum(first, []) == order
    single = data.train_loader(ds, 4, 0, DistInfo())
    assert isinstance(single.sampler, torch.utils.data.RandomSampler) and single.sampler.generator is None


def _loader_indices(n, rank, world_size, batch_size=4):
    ds = TensorDataset(torch.arange(n))
    loader = data.eval_loader(ds, batch_size, 0, DistInfo(rank=rank, world_size=world_size))
    batches = [b[0] for b in loader]
    assert all(len(b) <= batch_size for b in batches)
    return torch.cat(batches).tolist() if batches else []


@pytest.mark.parametrize('n', [11, 12, 1])
def test_eval_loader_shards_cover_every_index_once(n):
    shards = [_loader_indices(n, r, 2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(n))
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) == (n + 1) // 2 and len(shards[1]) == n // 2
    assert _loader_indices(n, 0, 1) == list(range(n))  # one process: everything, in order
    three = [_loader_indices(n, r, 3) for r in range(3)]
    assert sorted(sum(three, [])) == list(range(n))


def _counts(values):
    """topk_correct's counts as Python ints (it may return a list or a tensor)."""
    return [int(v) for v in values]


def test_topk_correct_hand_values():
    logits = torch.tensor([
        [9., 1., 2., 3., 4., 5.],   # target 0: top-1
        [0., 9., 8., 7., 6., 5.],   # target 5: 5th largest -> top-5 only
        [6., 5., 4., 3., 2., 1.],   # target 5: smallest -> neither
        [1., 2., 3., 4., 9., 5.],   # target 5: 2nd largest -> top-5 (and top-2)
    ])
    target = torch.tensor([0, 5, 5, 5])
    assert _counts(topk_correct(logits, target)) == [1, 3]
    assert _counts(topk_correct(logits, target, ks=(1, 2, 6))) == [1, 2, 4]
    assert _counts(topk_correct(logits, torch.tensor([1, 2, 0, 4]))) == [2, 3]  # row 0: target is the smallest


def test_evaluate_counts_one_process():
    logits = torch.tensor([[3., 0., 0., 0., 0., 1.], [0., 3., 0., 0., 1., 0.], [0., 0., 0., 0., 0., 3.]])
    target = torch.tensor([0, 4, 0])
    ds = TensorDataset(torch.arange(3), target)
    loader = data.eval_loader(ds, 2, 0, DistInfo())
    table = logits.clone()
    res = evaluate({'a': lambda idx: table[idx], 'b': lambda idx: -table[idx]}, loader, torch.device('cpu'))
    assert res['a']['correct1'] == 1 and res['a']['correct5'] == 3 and res['a']['count'] == 3
    assert res['a']['top1'] == pytest.approx(100 / 3) and res['a']['top5'] == pytest.approx(100.0)
    # Negated: row 0 -> 0 is the smallest logit (missed by top-5); row 1 -> 4 ties with zeros, row 2 -> 0 ties.
    want = _counts(topk_correct(-logits, target))
    assert res['b']['count'] == 3 and [res['b']['correct1'], res['b']['correct5']] == want


def test_val_subset_is_fixed_and_spread():
    ds = TensorDataset(torch.arange(1000))
    a, b = data.val_subset(ds, 100), data.val_subset(ds, 100)
    assert a.indices == b.indices == sorted(a.indices) and len(set(a.indices)) == 100
    torch.manual_seed(123)  # the global RNG (--seed) does not move it
    assert data.val_subset(ds, 100).indices == a.indices
    assert min(a.indices) < 100 and max(a.indices) >= 900  # spread over the split, not its first classes
    assert data.val_subset(ds, 1000) is ds
    for bad in (0, 1001):
        with pytest.raises(UserError, match=f'--num_val {bad} is outside 1..1000, the size of the val split'):
            data.val_subset(ds, bad)


@pytest.fixture(scope='module')
def six_val_images(tmp_path_factory):
    """make_image_folder's val/: 3 classes x 2 images, indices 0..5 in file order."""
    from utils.run.demo import make_image_folder
    return make_image_folder(str(tmp_path_factory.mktemp('six')), classes=3, train_per_class=4, val_per_class=2)


def test_val_subset_is_a_documented_fixed_set_of_files(six_val_images):
    """The documented rule (val_subset's docstring): a permutation from a generator of its own seeded 0, its first
    N entries, in file order. torch.randperm(6, generator=torch.Generator().manual_seed(0)) is
    [2, 5, 3, 0, 1, 4], so --num_val 3 evaluates indices 2, 3, 5 and --num_val 1 index 2, whatever --seed."""
    ds = data.image_dataset(six_val_images, 'val')
    assert [ds.relpath(i) for i in range(6)] == [f'val/n0000000{c}/{i}.JPEG' for c in range(3) for i in range(2)]
    torch.manual_seed(1234)  # the global generator (--seed) plays no part
    three, one = data.val_subset(ds, 3), data.val_subset(ds, 1)
    assert [ds.relpath(i) for i in three.indices] == ['val/n00000001/0.JPEG', 'val/n00000001/1.JPEG',
                                                      'val/n00000002/1.JPEG']
    assert [ds.relpath(i) for i in one.indices] == ['val/n00000001/0.JPEG']


def test_num_val_1_evaluates_exactly_one_image(six_val_images, tmp_path, monkeypatch):
    """A whole --eval fp run of the tiny conftest ViT with --num_val 1: one val image evaluated, recorded as
    num_val 1 of val_total 6, top-1 0 or 100 %."""
    import json
    import os
    from conftest import save_random_checkpoint
    from utils.run import cli, pipeline
    counted = []
    real_evaluate = pipeline.evaluate

    def spy(variants, loader, *args, **kwargs):
        out = real_evaluate(variants, loader, *args, **kwargs)
        counted.append({name: res['count'] for name, res in out.items()})
        return out
    monkeypatch.setattr(pipeline, 'evaluate', spy)
    ckpt = save_random_checkpoint('vit_test_tiny', str(tmp_path / 'tiny.pth'))
    out = str(tmp_path / 'out')
    result = cli.main('vit', ['--model', 'vit_test_tiny', '--data_dir', six_val_images, '--checkpoint', ckpt,
                              '--eval', 'fp', '--num_val', '1', '--eval_workers', '0', '--device', 'cpu',
                              '--output_dir', out])
    assert counted == [{'fp': 1}]
    assert (result['num_val'], result['val_total'], result['fp_top1']) in ((1, 6, 0.0), (1, 6, 100.0))
    assert json.load(open(os.path.join(out, 'result.json')))['num_val'] == 1


# SPEC §1, typed from its table: (mean, std, Resize size = int(224 / crop_pct)).
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SPEC_TRANSFORMS = {
    'vit_small': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 248), 'vit_base': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 248),
    **{f'deit_{s}{d}': (*_IMAGENET, 256) for s in ('tiny', 'small', 'base') for d in ('', '_distilled')},
    'swin_tiny': (*_IMAGENET, 248), 'swin_small': (*_IMAGENET, 248),
}


@pytest.fixture(scope='module')
def one_image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('one')
    for split in ('train', 'val'):
        (root / split / 'a').mkdir(parents=True)
        _rgb(8, 8).save(root / split / 'a' / '0.JPEG')
    return str(root)


@pytest.mark.parametrize('name', sorted(SPEC_TRANSFORMS))
def test_pipeline_builds_the_spec_transforms(name, one_image_root):
    """The transforms the pipeline really builds for each table model (not the registry's word for it)."""
    import argparse
    from types import SimpleNamespace
    from models import resolve_model
    from utils.run import pipeline
    mean, std, resize = SPEC_TRANSFORMS[name]
    args = argparse.Namespace(data_dir=one_image_root, num_val=None, strict_images=False, eval="both", batch_size=1, num_workers=0,
                              qwt_samples=0, allow_class_subset=True)
    splits = pipeline.open_splits(SimpleNamespace(args=args, spec=resolve_model(name), payload=None))
    val = splits.val.transform.transforms
    assert [type(t) for t in val] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert val[0].size == resize and val[0].interpolation == T.InterpolationMode.BICUBIC
    assert tuple(val[1].size) == (224, 224)
    assert tuple(val[3].mean.tolist()) == pytest.approx(mean, abs=1e-7) and tuple(val[3].std.tolist()) == pytest.approx(std, abs=1e-7)
    train = splits.train.transform.transforms
    assert [type(t).__name__ for t in train] == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip',
                                                 'RandAugment', 'ToTensor', 'Normalize']
    assert tuple(train[0].size) == (224, 224) and train[0].interpolation == Image.BICUBIC
    assert all(op.kwargs['fillcolor'] == tuple(round(255 * m) for m in mean) for op in train[2].ops)
    assert tuple(train[4].mean.tolist()) == pytest.approx(mean, abs=1e-7) and tuple(train[4].std.tolist()) == pytest.approx(std, abs=1e-7)
