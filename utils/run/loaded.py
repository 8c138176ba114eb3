"""``--load FILE``: the flags that say how a model is made are stored with it (``--save``'s meta); one typed
with another value than the file's would be silently ignored, so it is refused, as the bit widths are."""
from utils.core.errors import UserError

# flag dest -> the meta key that holds it (the same name, but for the QwT images: the count actually used)
STORED_AS = {'qwt_samples': 'num_qwt'}


def contradicting_flag(args, meta):
    """(dest, given, saved) of the first flag typed on the command line whose value differs from the one
    ``meta`` stores, or None. Flags not typed take the file's values."""
    typed = getattr(args, '_typed', {})
    for dest in typed:
        key = STORED_AS.get(dest, dest)
        if key in meta and meta[key] is not None and hasattr(args, dest) and getattr(args, dest) != meta[key]:
            return dest, getattr(args, dest), meta[key]
    return None


def check_load_flags(args, meta):
    """Raise a one-line UserError for a typed flag that contradicts the --load file's meta."""
    bad = contradicting_flag(args, meta or {})
    if bad:
        dest, given, saved = bad
        spelled = args._typed[dest]
        raise UserError(f"{spelled} {given} does not match --load {args.load}, made with {spelled} {saved}: leave "
                        f"{spelled} out (--load evaluates the saved model as it was made)")
