"""The lowest layer: small helpers every other part of the package may use (value checks, reading files)."""
