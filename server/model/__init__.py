"""The Gated DeltaNet + Memory Caching language model."""
