"""lowband node package."""
