"""Training and evaluation helpers for scripts/train.py and scripts/eval.py (not part of the server).

The scripts put this folder's parent on sys.path, so the modules import as `mctrain.<name>`.
"""
