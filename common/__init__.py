"""ldfleet."""
