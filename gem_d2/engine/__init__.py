"""gem_d2.engine."""
