"""Eager reference implementations transcribing shared METHODS.md (see each module)."""
