"""Built-in objective plugins, one module each."""
