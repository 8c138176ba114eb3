"""Percentile + QwT (group-convolution compensation) on ResNet-18/50/101. See README.md."""
from utils.run.cli import main

if __name__ == '__main__':
    main('resnet')
