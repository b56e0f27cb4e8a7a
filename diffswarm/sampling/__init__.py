"""Sampling: integrating dx/dt = v(x, t) from noise (t = 1) to data (t = 0) over the one velocity contract.

The step functions (:mod:`.steps`: Euler, Heun, the time grid), the trajectory hooks a model may declare
(:mod:`.hooks`: reset, begin/end of steps, rollbacks, the routing record), the one sampler loop with its
``StepInfo`` callback that generation, tracing and diagnostics share (:mod:`.loop`), and the sampling
settings the CLI, the demo and the dashboard share (:mod:`.config`)."""
