"""gem_d2.evaluation."""
