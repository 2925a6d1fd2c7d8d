"""lowband protocols package."""
