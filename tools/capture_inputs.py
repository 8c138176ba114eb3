"""Capture the calibration batch and QwT images another script (the published QwT code, say) really feeds
itself, and compare two such files bit for bit: the published run against this project's --dump_inputs.

    python tools/capture_inputs.py capture --data_dir DATA_DIR --out published.pth -- \\
        /path/to/QwT/qwt_vit_and_deit.py --model deit_tiny --data_dir DATA_DIR ...
    python qwt_vit_and_deit.py --model deit_tiny --data_dir DATA_DIR --dump_inputs ours.pth
    python tools/capture_inputs.py compare published.pth ours.pth

`capture` runs the script in a process of its own, where none of this project's packages shadow the script's
own (the published code has its own `utils` and `quant`), with RandAugment's posterize fixed for Pillow 13
(SPEC §1, 'Known trap'); it records the first batch of its first iteration over DATA_DIR/train and the first
--qwt_samples / WORLD_SIZE images of the next one (SPEC §1b), then stops it and writes the file in
--dump_inputs's format (under torchrun, rank r > 0 writes OUT.rank<r>). `compare` exits 0 when both files
hold the same files and the same pixels, 1 (saying where they differ) otherwise.
"""
import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.core.environment import env_int  # noqa: E402
from utils.core.errors import UserError  # noqa: E402
from utils.run.cli import quiet_known_warnings  # noqa: E402

quiet_known_warnings()  # timm 0.4.12's, before it is imported
# torch, timm and the capture hooks load where they are used: the process that starts the script's own
# process only waits for it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    c = sub.add_parser('capture', help="record a script's calibration batch and QwT images")
    c.add_argument('--data_dir', required=True, help='the folder the script reads (its train/ is watched)')
    c.add_argument('--out', required=True, help='file to write, as --dump_inputs writes it')
    c.add_argument('--qwt_samples', type=int, default=512, help='QwT images over all processes (default 512)')
    c.add_argument('--cpu', action='store_true',
                   help='run a script written for one GPU on the CPU: .cuda() is a no-op, cuda devices become the CPU')
    c.add_argument('--keep_files', default=None, metavar='DIR',
                   help='run the script in DIR and keep the files it writes there (checkpoint/, logs); by default '
                        'it runs in a scratch folder of its own, removed afterwards')
    c.add_argument('--in_process', action='store_true', help=argparse.SUPPRESS)  # the child that runs the script
    c.add_argument('script', help='the script to run, then its own arguments (after --)')
    c.add_argument('script_args', nargs=argparse.REMAINDER)
    k = sub.add_parser('compare', help='compare two --dump_inputs files bit for bit')
    k.add_argument('a')
    k.add_argument('b')
    return p.parse_args(argv)


def capture(args, argv):
    world_size, rank = env_int('WORLD_SIZE', 1), env_int('RANK', 0)
    if args.qwt_samples <= 0 or args.qwt_samples % world_size:
        raise UserError(f'--qwt_samples {args.qwt_samples} must be a positive multiple of WORLD_SIZE {world_size}')
    if not os.path.isfile(args.script):
        raise UserError(f'script {args.script!r} not found')
    if not args.in_process:  # the script's own process; its errors are its own lines, its exit code ours
        return run_in_scratch(args)
    import torch
    from utils.core.files import rank_path, write_atomic
    from utils.run.data import fix_posterize
    from utils.table.capture import capture_inputs, cuda_on_cpu
    fix_posterize()  # the published code crashes on Pillow 13 without it
    script_args = args.script_args[1:] if args.script_args[:1] == ['--'] else args.script_args
    with cuda_on_cpu() if args.cpu else contextlib.nullcontext():
        inputs = capture_inputs(args.script, script_args, args.data_dir, args.qwt_samples // world_size,
                                project_root=ROOT)
    out = rank_path(args.out, rank)
    write_atomic(out, lambda tmp: torch.save(inputs, tmp))
    print(f"wrote the calibration batch {tuple(inputs['calib'].shape)} and {len(inputs['qwt'])} QwT images "
          f'to {out}', file=sys.stderr)


# Folders a script reads by a relative path from its working folder: the published ResNet script loads
# pretrained_weights/<file> (SPEC §3b). Linked into the scratch folder; never written there.
SCRIPT_INPUTS = ('pretrained_weights',)


def absolute(arg):
    """``arg`` (or the value of ``--flag=arg``) as an absolute path if it names an existing file or folder, so
    that the script finds it from its scratch folder."""
    flag, eq, value = arg.partition('=') if arg.startswith('-') else ('', '', arg)
    return flag + eq + os.path.abspath(value) if value and os.path.exists(value) else arg


def run_in_scratch(args):
    """Run the capture in a process of its own whose current folder is --keep_files or a scratch folder
    (removed afterwards), so that what the script writes (the published one: checkpoint/<model>/.../log.txt)
    lands nowhere else. Returns its exit code."""
    folder = args.keep_files or tempfile.mkdtemp(prefix='capture_inputs_')
    os.makedirs(folder, exist_ok=True)
    for name in SCRIPT_INPUTS:  # what a script reads by a relative path stays where it looks
        here, there = os.path.abspath(name), os.path.join(folder, name)
        if os.path.exists(here) and not os.path.lexists(there):
            os.symlink(here, there)
    script_args = args.script_args[1:] if args.script_args[:1] == ['--'] else args.script_args
    child = [sys.executable, os.path.abspath(__file__), 'capture', '--in_process', '--data_dir',
             os.path.abspath(args.data_dir), '--out', os.path.abspath(args.out), '--qwt_samples', str(args.qwt_samples),
             *(['--cpu'] if args.cpu else []), os.path.abspath(args.script), '--', *map(absolute, script_args)]
    try:
        return subprocess.call(child, cwd=folder)
    finally:
        if args.keep_files is None:
            shutil.rmtree(folder, ignore_errors=True)


def compare(args):
    import torch
    from utils.table.capture import compare_inputs
    a, b = (torch.load(path, map_location='cpu', weights_only=True) for path in (args.a, args.b))
    lines = compare_inputs(a, b)
    for line in lines:
        print(line)
    kinds = {'calib': f"{len(a['calib_files'])} calibration", 'qwt': f"{len(a['qwt_files'])} QwT"}
    differ = [k for k in kinds if any(line.startswith(k) for line in lines)]  # 'calib_files: ...' is 'calib'
    if not lines or len(differ) == len(kinds):
        print(f"{'different' if lines else 'identical'}: {' and '.join(kinds.values())} images in {args.a}")
    else:  # name only what differs
        same = [v for k, v in kinds.items() if k not in differ]
        print(f"different: {' and '.join(kinds[k] for k in differ)} images in {args.a} (the {' and '.join(same)} "
              "images are identical)")
    return 1 if lines else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        sys.exit(compare(args) if args.command == 'compare' else capture(args, argv) or 0)
    except (UserError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
