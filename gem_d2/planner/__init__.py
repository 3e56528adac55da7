"""gem_d2.planner."""
