"""Command-line tools (LMDB writer, description encoder)."""
