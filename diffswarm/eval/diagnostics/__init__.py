"""Stability and expert-data alignment diagnostics over velocity models.

Pure functions over anything with ``velocity(x, t, labels, guidance) -> v`` (x: (B, C, H, W),
t: (B,) flow time, labels: (B,) with -1 = none), including a
:class:`~diffswarm.router.ensemble.RoutedEnsemble` under any routing strategy. Conventions are
those of :mod:`diffswarm.experts.schedules`: t = 0 data, x_t = (1 - t) x0 + t eps, v = eps - x0,
sampling integrates dx/dt = v from t = 1 to 0. D = C * H * W below.

They test the alignment study's claims (Villagra et al. 2026; science sheet, "Expert-data
alignment"), whose exact estimators are not public; the definitions here are ours:

- :mod:`.stability`: local Lipschitz estimates and the refinement gap (and ``side_effect_free``).
- :mod:`.alignment`: expert-data alignment per step, on generated or on real noised data.
- :mod:`.tracing`: ``trace_sampling``, the sampler loop with a callback that records them all.

Diagnostic calls never change what the sampler does: they restore a ``RoutedEnsemble``'s
``last`` record, ``calls`` counters and ``gumbel`` noise afterwards.
"""
