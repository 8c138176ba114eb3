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
