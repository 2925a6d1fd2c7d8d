"""lowband coordinator package."""
