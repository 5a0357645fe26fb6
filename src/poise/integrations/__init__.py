"""Adapters to other training stacks, imported lazily (each needs its own extra)."""
