"""One run of an entry script (qwt_vit_and_deit.py, qwt_swin.py): see utils/__init__.py for the map."""
