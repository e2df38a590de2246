"""Data shipped with the package: the demo corpus (Genesis, King James Version, public domain)."""
