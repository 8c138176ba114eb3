"""tools/check_lock.py: the environment against requirements-lock.txt, on hand-made metadata."""
import os
from types import SimpleNamespace

from conftest import ROOT
from tools.check_lock import canonical, closure, problems, read_lock, read_requirements


def dist(version, *requires):
    return SimpleNamespace(version=version, requires=list(requires))


def test_each_difference_is_one_line_naming_the_package():
    lock = {'app-core': '1.0', 'dep': '2.0', 'torch': '2.14.1', 'old': '0.1'}
    installed = {'app-core': dist('1.0', 'dep>=1', 'torch', 'extra-only; extra == "docs"',
                                  'py2-only; python_version < "3"', 'unlocked'),
                 'dep': dist('2.1'), 'torch': dist('2.14.1+cpu'), 'unlocked': dist('3.0'), 'stray': dist('1.0'),
                 'pip': dist('26.3'), 'old': dist('0.1')}
    assert problems(lock, ['App_Core>=1'], installed) == [
        'unlocked 3.0: pulled in by the requirements but not in the lock (regenerate the lock)',
        'dep: installed 2.1, the lock says 2.0']
    assert problems(lock, ['App_Core>=1'], installed, exact=True)[2:] == [
        'stray 1.0: installed but not in the lock (a leftover a fresh install would not have: uninstall it, '
        'or use a new environment)']
    del installed['torch']
    assert 'torch: not installed (the lock says 2.14.1)' in problems(lock, ['app-core'], installed)


def test_a_local_build_label_is_the_same_version_and_names_are_canonical():
    assert problems({'torch': '2.14.1'}, ['torch'], {'torch': dist('2.14.1+cu130')}) == []
    assert problems({'torch': '2.14.1'}, ['torch'], {'torch': dist('2.14.2+cpu')}) == [
        'torch: installed 2.14.2+cpu, the lock says 2.14.1']
    assert canonical('Jinja2') == 'jinja2' and canonical('typing_extensions') == 'typing-extensions'
    assert closure(['a'], {'a': ['B.c ; python_version >= "3"'], 'b-c': []}.get) == {'a', 'b-c'}


def test_the_repository_lock_covers_its_requirements(tmp_path):
    lock = read_lock(os.path.join(ROOT, 'requirements-lock.txt'))
    for line in read_requirements(os.path.join(ROOT, 'requirements.txt')):
        name = canonical(line.split('=')[0].split('>')[0].split('<')[0].strip())
        assert name in lock, f'{name} is in requirements.txt but not in the lock'
    assert lock['timm'] == '0.4.12' and lock['torch'] == '2.14.1' and lock['torchvision'] == '0.29.1'
    bad = tmp_path / 'lock.txt'
    bad.write_text('# comment\ntorch>=2\n')
    try:
        read_lock(str(bad))
    except ValueError as e:
        assert str(e) == f"{bad}:2: expected name==version, got 'torch>=2'"
    else:
        raise AssertionError('a line without == was accepted')


def test_the_readme_cuda_index_route_passes():
    """The README's route for older drivers: torch 2.14.1+cu126 from pytorch.org's index pulls CUDA 12
    libraries (and maybe another triton) that the lock (PyPI's CUDA 13 build) does not list. They are that
    build's own and pass, with and without --exact; anything else is still checked."""
    lock = {'torch': '2.14.1', 'torchvision': '0.29.1', 'nvidia-cublas': '13.1.1.3', 'triton': '3.8.0',
            'numpy': '2.0', 'timm': '0.4.12'}
    installed = {'torch': dist('2.14.1+cu126', 'nvidia-cublas-cu12==12.6.4.1; platform_system == "Linux"',
                               'nvidia-cudnn-cu12==9.10', 'triton==3.7.0', 'cuda-bindings>=12', 'numpy'),
                 'torchvision': dist('0.29.1+cu126', 'torch==2.14.1', 'numpy'),
                 'nvidia-cublas-cu12': dist('12.6.4.1'), 'nvidia-cudnn-cu12': dist('9.10', 'nvidia-cublas-cu12'),
                 'triton': dist('3.7.0'), 'cuda-bindings': dist('12.9.0'), 'numpy': dist('2.0'),
                 'timm': dist('0.4.12', 'torch', 'torchvision')}
    assert problems(lock, ['timm', 'torch', 'torchvision'], installed) == []
    assert problems(lock, ['timm', 'torch', 'torchvision'], installed, exact=True) == []
    installed['numpy'] = dist('2.1')  # the rest is still checked
    assert problems(lock, ['timm'], installed) == ['numpy: installed 2.1, the lock says 2.0']
    installed['numpy'] = dist('2.0')
    installed['torch'] = dist('2.14.1', *installed['torch'].requires)  # PyPI's build: its libraries are locked
    assert problems(lock, ['timm'], installed) == [
        'cuda-bindings 12.9.0: pulled in by the requirements but not in the lock (regenerate the lock)',
        'nvidia-cublas-cu12 12.6.4.1: pulled in by the requirements but not in the lock (regenerate the lock)',
        'nvidia-cudnn-cu12 9.10: pulled in by the requirements but not in the lock (regenerate the lock)',
        'triton: installed 3.7.0, the lock says 3.8.0']
