"""Reproduce the whole QwT table in one command: every model, bit width and seed (and the full-precision
model once per model) on every GPU, resumable, then the table (mean ± std over seeds next to the
published figures) and its figures. See README.md, "Reproduce the whole table", and --help.

    python tools/reproduce.py --data_dir /path/to/imagenet --seeds 0 1 2
"""
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated')  # timm 0.4.12 on a new torch
from utils.runner.command import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
