"""tools/reproduce.py: the whole table in one command (plan, cell records, progress, backends)."""
