"""RepQ-ViT + QwT on ViT and DeiT (plain and distilled). See README.md."""
from utils.run.cli import main

if __name__ == '__main__':
    main('vit')
