"""The calibration batch and QwT images that any script really feeds itself (SPEC §1b), captured from its
DataLoader iterations over DATA_DIR/train, in the format of ``--dump_inputs``: for holding a run of the
published code, which has no dump option, against this project bit for bit (tools/capture_inputs.py).

SPEC §1b: the first batch of the first iteration over the training split is the calibration batch; the
next iteration's batches are the QwT images. Once this process's share of them is seen, the script is
stopped, before the QwT fit.

The script runs in a process of its own (tools/capture_inputs.py starts it) with this project's packages
out of the way: the published code has ``utils`` and ``quant`` packages of its own."""
import contextlib
import os
import runpy
import sys

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import Subset, dataloader

from utils.core.errors import UserError


class InputsCaptured(BaseException):
    """Stops the script once its inputs are captured; a BaseException, so that a script's own
    ``except Exception`` does not swallow it."""


def _names_files(dataset):
    return getattr(getattr(dataset, 'parser', None), 'root', None) is not None


def _inner(dataset):
    inner = getattr(dataset, 'dataset', None)
    return inner if inner is not None else getattr(dataset, 'base', None)


def image_dataset(dataset):
    """The timm ImageDataset under ``dataset`` (through Subset-like ``.dataset`` / ``.base`` wrappers),
    which names the files; None if there is none."""
    while dataset is not None and not _names_files(dataset):
        dataset = _inner(dataset)
    return dataset


def file_name(dataset, index):
    """The file of ``dataset[index]``, relative to its ImageDataset's folder (a Subset's index mapped)."""
    while not _names_files(dataset):
        if isinstance(dataset, Subset):
            index = dataset.indices[index]
        dataset = _inner(dataset)
    return dataset.filename(index)


class InputCapture:
    """Watches every DataLoader iteration; those over ``data_dir``/train are recorded: iteration 0's first
    batch (calibration) and iteration 1's first ``qwt_images`` images (QwT)."""

    def __init__(self, data_dir, qwt_images):
        self.train_root = os.path.realpath(os.path.join(data_dir, 'train'))
        self.qwt_images = qwt_images
        self.iterations = 0
        self.calib = self.calib_files = None
        self.qwt, self.qwt_files = [], []

    def _is_train(self, loader):
        images = image_dataset(loader.dataset)
        return images is not None and os.path.realpath(images.parser.root) == self.train_root

    @contextlib.contextmanager
    def installed(self):
        """Patches DataLoader iterators for the duration: each train iteration remembers the index batches
        it sends out (in order, whether workers prefetch or not) and hands each batch it yields here."""
        cls = dataloader._BaseDataLoaderIter
        init, next_index, next_ = cls.__init__, cls._next_index, cls.__next__
        capture = self

        def patched_init(it, loader, *a, **k):
            it._capture_iteration = None  # set before init, which already sends out the workers' first indices
            if capture._is_train(loader):
                it._capture_iteration, it._capture_indices, it._capture_yielded = capture.iterations, [], 0
                capture.iterations += 1
            init(it, loader, *a, **k)

        def patched_next_index(it):
            indices = next_index(it)
            if it._capture_iteration is not None:
                it._capture_indices.append(list(indices))
            return indices

        def patched_next(it):
            batch = next_(it)
            if it._capture_iteration is not None:
                indices = it._capture_indices[it._capture_yielded]
                it._capture_yielded += 1
                capture._record(it._capture_iteration, batch, indices, it._dataset)
            return batch

        cls.__init__, cls._next_index, cls.__next__ = patched_init, patched_next_index, patched_next
        try:
            yield self
        finally:
            cls.__init__, cls._next_index, cls.__next__ = init, next_index, next_

    def _record(self, iteration, batch, indices, dataset):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        names = [os.path.join('train', file_name(dataset, i)) for i in indices]  # the file sampled (timm may skip on)
        if iteration == 0 and self.calib is None:
            self.calib, self.calib_files = images.detach().float().cpu().clone(), names
        elif iteration == 1:
            room = self.qwt_images - sum(len(x) for x in self.qwt)
            self.qwt.append(images[:room].detach().float().cpu().clone())
            self.qwt_files += names[:room]
            if len(self.qwt_files) >= self.qwt_images:
                raise InputsCaptured()

    def payload(self):
        """The ``--dump_inputs`` dict."""
        return {'calib': self.calib, 'qwt': torch.cat(self.qwt), 'calib_files': self.calib_files,
                'qwt_files': self.qwt_files}


def _cpu(device):
    if isinstance(device, torch.device) and device.type == 'cuda':
        return torch.device('cpu')
    if isinstance(device, str) and device.split(':')[0] == 'cuda':
        return 'cpu'
    return device


class _CudaOnCpu(TorchFunctionMode):
    """Every ``device=cuda...`` argument of a torch function and every ``.to(cuda...)`` becomes the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if 'device' in kwargs:
            kwargs['device'] = _cpu(kwargs['device'])
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_on_cpu():
    """A script written for one GPU runs on the CPU: ``.cuda()`` of tensors and modules is a no-op, cuda
    devices in torch calls and ``.to()`` become the CPU, and ``torch.cuda.synchronize`` does nothing."""
    saved = torch.Tensor.cuda, nn.Module.cuda, torch.cuda.synchronize
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        with _CudaOnCpu():
            yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda, torch.cuda.synchronize = saved


def top_level_names(root):
    """The importable top-level packages and modules of the folder ``root``."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith('.py'):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, '__init__.py')):
            names.add(entry)
    return names


@contextlib.contextmanager
def without_packages_of(root):
    """``root`` off sys.path and its packages out of sys.modules for the duration, so that a script's own
    ``utils`` or ``quant`` is the one it imports (functions already imported from ``root`` keep working)."""
    names = top_level_names(root)
    real = os.path.realpath(root)
    path = list(sys.path)
    shadowing = {k: m for k, m in sys.modules.items() if k.split('.')[0] in names}
    for k in shadowing:
        del sys.modules[k]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != real]
    try:
        yield
    finally:
        sys.path[:] = path
        for k in [k for k in sys.modules if k.split('.')[0] in names]:
            del sys.modules[k]
        sys.modules.update(shadowing)


def capture_inputs(script, script_args, data_dir, qwt_images, project_root=None):
    """Runs ``script`` as ``__main__`` with ``script_args`` and returns its ``--dump_inputs`` dict, stopping
    it once ``qwt_images`` QwT images are seen. With ``project_root``, that folder's packages are hidden from
    the script (tools/capture_inputs.py runs this in a process of its own)."""
    if not os.path.isfile(script):
        raise UserError(f'script {script!r} not found')
    capture = InputCapture(data_dir, qwt_images)
    argv, path = sys.argv, list(sys.path)
    sys.argv = [script, *script_args]
    try:
        with without_packages_of(project_root) if project_root else contextlib.nullcontext(), capture.installed():
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` would
            runpy.run_path(script, run_name='__main__')
    except InputsCaptured:
        return capture.payload()
    except SystemExit as e:
        if e.code not in (None, 0):
            raise UserError(f'{script} exited with status {e.code} before its QwT images were drawn') from None
    finally:
        sys.argv, sys.path[:] = argv, path
    raise UserError(f'{script} finished after {capture.iterations} iteration(s) over {capture.train_root} and '
                    f'{len(capture.qwt_files)} QwT image(s); expected the calibration iteration, then one that '
                    f'yields {qwt_images} images (is --data_dir the folder the script reads?)')


def compare_inputs(a, b):
    """Lines describing how two ``--dump_inputs`` dicts differ; empty when they are equal bit for bit."""
    lines = []
    for key in ('calib_files', 'qwt_files'):
        if a[key] != b[key]:
            first = next((i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y), min(len(a[key]), len(b[key])))
            lines.append(f'{key}: {len(a[key])} vs {len(b[key])} files, first difference at {first}')
    for key in ('calib', 'qwt'):
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            lines.append(f'{key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}')
        elif not torch.equal(x, y):
            differ = (x != y).flatten(1).any(1)
            lines.append(f'{key}: {int(differ.sum())} of {len(x)} images differ, the first at {int(differ.nonzero()[0])}; '
                         f'largest difference {float((x - y).abs().max()):.3g}')
    return lines
