"""Placeholder: this backend is being written; it registers nothing yet."""
