"""Structured outputs: llguidance grammars applied as a batch token mask (docs/STRUCTURED_OUTPUTS.md)."""
