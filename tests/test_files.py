"""Atomic writes: the new file appears whole or not at all, and an old one survives a failed write."""
import os
import stat

import pytest

from utils.core.files import write_atomic, write_text_atomic


def test_replaces_whole_file_without_leftovers(tmp_path):
    path = tmp_path / 'sub' / 't.md'
    write_text_atomic(str(path), 'old\n')
    write_text_atomic(str(path), 'new\n')
    assert path.read_text() == 'new\n' and os.listdir(tmp_path / 'sub') == ['t.md']


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / 'result.json'
    write_text_atomic(str(path), 'finished run\n')

    def half_then_crash(tmp):
        with open(tmp, 'w') as f:
            f.write('half')
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError, match='disk full'):
        write_atomic(str(path), half_then_crash)
    assert path.read_text() == 'finished run\n' and os.listdir(tmp_path) == ['result.json']


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(str(tmp_path / 'x'), 'x')
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'x').st_mode) == 0o644
