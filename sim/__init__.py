"""lowband sim package."""
