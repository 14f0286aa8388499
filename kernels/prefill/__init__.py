"""Prefill of an MC-GDN layer core: many tokens of a sequence, checkpoints at segment boundaries."""
