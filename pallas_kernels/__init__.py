"""Pallas GPU kernels (proven on CPU in interpret mode)."""
