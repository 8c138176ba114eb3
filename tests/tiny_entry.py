"""The real entry point for the tiny test models of conftest.py (vit_test_tiny, swin_test_tiny), which are
registered with timm only in a process that imports conftest: tools/reproduce.py's --script in tests that run
the whole pipeline in child processes."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (registers the tiny models; puts the repository on sys.path)
from utils.run.cli import main  # noqa: E402

if __name__ == '__main__':
    model = sys.argv[sys.argv.index('--model') + 1] if '--model' in sys.argv else ''
    main('swin' if model.startswith('swin') else 'vit')
