"""Training orchestration: what one volunteer trains (jobs), the worker pool that runs trainings side by side
(pool) and the named sizes the demo and the eval share (presets)."""
