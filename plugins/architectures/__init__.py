"""Built-in architecture plugins, one module each."""
