"""Command-line tools that are not entry points of their own (AOT compilation for TPU topologies)."""
