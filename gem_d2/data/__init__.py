"""gem_d2.data."""
