"""Training orchestration: what one volunteer trains (jobs)."""
