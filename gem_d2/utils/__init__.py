"""Small helpers that do not depend on the rest of gem_d2 (e.g. :mod:`gem_d2.utils.safe_load`)."""
