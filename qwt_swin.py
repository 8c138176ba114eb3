"""RepQ-ViT + QwT on Swin transformers. See README.md."""
from utils.pipeline import main

if __name__ == '__main__':
    main('swin')
