"""Utilities: atomic file writes (fileio) and image grids and sample files (images)."""
