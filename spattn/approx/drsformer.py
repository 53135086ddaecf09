"""Placeholder: this module is being written (its imports register mechanisms)."""
