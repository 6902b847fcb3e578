"""Built-in task plugins, one module each."""
