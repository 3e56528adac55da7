"""gem_d2.modeling."""
