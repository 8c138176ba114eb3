"""Names a run is known by: the entry script of each model family and the folder a run writes to.
Imports nothing of torch, so that flags are checked before torch loads."""
import os

FAMILY_SCRIPTS = {'vit': 'qwt_vit_and_deit.py', 'swin': 'qwt_swin.py', 'resnet': 'qwt_resnet.py'}


def output_folder(model, w_bits=None, a_bits=None, seed=None, demo=False, loaded=False, parent='output', ptq=None,
                  variant=()):
    """``parent/[demo_]<model>_<w4a4|fp>[_<ptq>][_<flag>-<value>...][_seed<S>][_loaded]``: ``w_bits`` None is
    the full-precision model; ``ptq`` a --ptq method other than the family's default (None for the default: its
    folders keep their names); ``variant``, (flag, value) pairs, the flags that change the computation set to
    other values than their defaults (so that a variant never replaces the default run's result.json);
    ``seed`` is named by the table runner, whose cells differ by seed; ``loaded`` marks a --load run."""
    bits = 'fp' if w_bits is None else f'w{w_bits}a{a_bits}'
    method = '' if ptq is None or w_bits is None else f'_{ptq}'
    flags = ''.join(f'_{name}-{value}' for name, value in variant)
    name = (f"{'demo_' if demo else ''}{model}_{bits}{method}{flags}{'' if seed is None else f'_seed{seed}'}"
            f"{'_loaded' if loaded else ''}")
    return os.path.join(parent, name)


# The post-training quantizer of each family's published script, named so in logs, result.json and the table.
FAMILY_METHODS = {'vit': 'RepQ-ViT', 'swin': 'RepQ-ViT', 'resnet': 'Percentile'}
