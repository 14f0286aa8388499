"""Ownership of checkpoint blocks: the pools, per-sequence tables, the prefix tree, utilities, transfers."""
