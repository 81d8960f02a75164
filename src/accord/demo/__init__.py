"""accord demo: the whole chain on embedded data."""
