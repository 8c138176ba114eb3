"""File writes that never leave a half-written file behind, and the matching read."""
import json
import os
import tempfile


def read_json(path):
    """The JSON in ``path``, or None where it is missing or not (yet) valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_atomic(path, write):
    """Call ``write(tmp_path)``, then rename the temporary file onto ``path``: a reader (or a killed
    run) never sees a half-written file, and an earlier file at ``path`` stays until the new one is whole."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text):
    """``text`` to ``path`` through ``write_atomic``."""
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            f.write(text)
    write_atomic(path, write)


def rank_path(path, rank):
    """Where process ``rank`` writes its own copy of ``path`` (--dump_inputs, capture_inputs.py): ``path``
    for rank 0, ``path.rank<r>`` for the others."""
    return path if rank == 0 else f'{path}.rank{rank}'
