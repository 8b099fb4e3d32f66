"""Model families, their coordinate conventions, and tiny models built from config for tests and the demo."""
