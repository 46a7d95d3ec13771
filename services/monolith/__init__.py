"""monolith: real-time recommendation with a collisionless embedding table."""
