"""Streaming DiLoCo among a stage's replicas: the outer loop, the averaging math, the backends."""
