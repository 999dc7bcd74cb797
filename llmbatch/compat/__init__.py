"""Drop-in compatibility layers for other libraries' APIs."""
