"""The foundations: imports nothing from utils.run, utils.table or utils.runner (see utils/__init__.py)."""
