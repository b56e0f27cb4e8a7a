"""The statistics router: p(k | x_t, t, class) in closed form from statistics each peer publishes.

The trained router (:mod:`diffswarm.router.model`) needs every cluster's images in one place. Here each peer
computes a few summary statistics of its own cluster (:func:`.publish.cluster_stats`), publishes them as a
small versioned blob (:meth:`.blob.ClusterStats.to_bytes`), and anyone holding the K blobs builds a
:class:`.router.StatsRouter` that answers ``probs(x, t, labels)`` like the trained router, with no
central data and no training. The idea is the one the science sheet leaves open ("e.g. from
per-expert statistics each peer publishes"); the papers give no recipe, so this package is ours.

- :mod:`.basis`: the fixed, data-independent feature space (``DCTBasis``).
- :mod:`.blob`: ``ClusterStats``, one cluster's Gaussian statistics, and their versioned msgpack blob.
- :mod:`.publish`: what a peer computes from its own images (``cluster_stats``) and the
  ``cluster_stats.bin`` file beside its checkpoint.
- :mod:`.router`: ``StatsRouter``, the closed-form posterior over clusters.
"""
