"""Small helpers shared by every package of gem_d2: file writing, input checks, safe loading of user files."""
