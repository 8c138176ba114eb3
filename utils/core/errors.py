"""Errors the scripts report as one line (exit code 2) instead of a traceback."""


class UserError(ValueError):
    """A problem with the user's input: the message names the bad value and the fix."""


class ImageDecodeError(UserError):
    """An image file that Pillow cannot read (raised inside data-loader workers, so it takes one str)."""


def one_line(exc):
    """The message of ``exc`` on one line. An exception re-raised by a DataLoader worker carries the
    worker's traceback in its message; keep only its last line, without the class name."""
    text = str(exc).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1]
        name, sep, rest = text.partition(': ')  # 'utils.errors.ImageDecodeError: ...'
        if sep and name.rsplit('.', 1)[-1] == type(exc).__name__:
            text = rest
    return ' '.join(text.split()) or type(exc).__name__



def cause(exc, limit=200):
    """'TypeName: first line of the message', cut to ``limit`` characters: the reason a library call
    failed, to quote inside a one-line error."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}".rstrip(': ')
