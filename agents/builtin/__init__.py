"""Built-in agent specs."""
