"""mcserve clients: CLI chat and load generator."""
