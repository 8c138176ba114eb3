"""The suite's own patches of torch: every ``monkeypatch.setattr`` of a torch module's attribute is one whose
undo is shown here to restore it, on the pytest installed; backend flags go through ``conftest.torch_flags``.
(pytest 9.2's undo deletes an attribute that a module serves through ``__getattr__``, such as
``torch.backends.cuda.matmul.allow_tf32``, instead of restoring it.)"""
import importlib
import os
import re

import pytest
import torch

from conftest import ROOT, torch_flags

# (module, attribute) pairs the suite patches with monkeypatch.setattr
UNDO_CHECKED = {('torch', 'quantile'), ('torch', 'inverse'), ('torch', 'load'), ('torch', 'equal'),
                ('torch.cuda', 'is_available'), ('torch.version', 'cuda'), ('torch._utils', 'cpu_count'),
                ('torch.cuda', 'current_device'), ('torch.cuda', 'device_count'), ('torch.cuda', 'set_device')}
# any MonkeyPatch, whatever the fixture calls it (``monkeypatch``, or a fixture that returns it)
PATCH = re.compile(r"\b\w+\.setattr\(\s*(torch(?:\.\w+)*)\s*,\s*'(\w+)'")


def test_monkeypatch_undo_restores_the_torch_attributes_the_suite_patches():
    for module_name, name in sorted(UNDO_CHECKED):
        module = importlib.import_module(module_name)
        before, sentinel = getattr(module, name), object()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, name, sentinel)
            assert getattr(module, name) is sentinel
        assert getattr(module, name) is before, f'{module_name}.{name} not restored by monkeypatch'


def test_every_monkeypatch_of_torch_in_the_suite_is_one_checked_above():
    found = set()
    for name in sorted(os.listdir(os.path.join(ROOT, 'tests'))):
        if name.endswith('.py') and name != os.path.basename(__file__):
            with open(os.path.join(ROOT, 'tests', name)) as f:
                found |= {(m.group(1), m.group(2)) for m in PATCH.finditer(f.read())}
    assert ('torch', 'quantile') in found  # the pattern does find the suite's patches
    assert found - UNDO_CHECKED == set(), 'patch these with conftest.torch_flags, or check their undo above'


def test_torch_flags_restores_a_flag_served_by_getattr():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark
    with torch_flags((matmul, 'allow_tf32', not before[0]), (cudnn, 'allow_tf32', not before[1]),
                     (cudnn, 'benchmark', not before[2])):
        assert (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark) == tuple(not b for b in before)
    assert (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark) == before
    with pytest.raises(RuntimeError), torch_flags((matmul, 'allow_tf32', not before[0])):
        raise RuntimeError('a failing test')
    assert matmul.allow_tf32 == before[0]
