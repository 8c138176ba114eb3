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


# The runs behind the `slow` marker (tests/conftest.py): module fixtures that run the README's figure runs or
# the published code, and the tests that run them themselves.
SLOW_FIXTURES = {('test_readme_demo.py', 'demo_runs'), ('test_digits.py', 'pinned_runs'),
                 ('test_ptq_demos.py', 'runs'), ('test_resnet_published.py', 'both')}
SLOW_TESTS = {('test_published.py', 'test_published_script_draws_what_dump_inputs_writes'),
              ('test_resnet_run.py', 'test_published_resnet_script_draws_what_dump_inputs_writes'),
              ('test_readme_example.py', 'test_readme_example_runs_as_printed')}


def slow_marker_gaps(items, markexpr=''):
    """The tests among ``items`` that run one of the runs above without the `slow` marker; and, where every
    file named above was collected unfiltered, the fixtures and tests above that no item uses any more."""
    slow = [item for item in items if (item.path.name, item.originalname) in SLOW_TESTS
            or any((item.path.name, name) in SLOW_FIXTURES for name in item.fixturenames)]
    gaps = [item.nodeid for item in slow if not item.get_closest_marker('slow')]
    if {name for name, _ in SLOW_FIXTURES | SLOW_TESTS} <= {item.path.name for item in items} and not markexpr:
        found = {(item.path.name, name) for item in slow for name in (*item.fixturenames, item.originalname)}
        gaps += sorted(f'{f}::{name} (gone)' for f, name in (SLOW_FIXTURES | SLOW_TESTS) - found)
    return gaps


def test_every_figure_and_published_run_is_marked_slow(request):
    """`-m "not slow"` must leave out every one of them (and only a marker does)."""
    assert slow_marker_gaps(request.session.items, request.config.getoption('markexpr')) == []
