"""RepQ-ViT + QwT on Swin transformers. See README.md."""
from utils.run.cli import main

if __name__ == '__main__':
    main('swin')
