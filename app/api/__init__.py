"""The HTTP layer's wiring, above the domains: the dependencies routes declare."""
