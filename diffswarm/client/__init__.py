"""The swarm client: its settings and errors (:mod:`.config`), pure replica selection and bans
(:mod:`.selection`), the swarm view (:mod:`.discovery`), the network shell (:mod:`.client`) and its parts
(:mod:`.transport`, :mod:`.refresh`, :mod:`.bootstrap`, :mod:`.downloads`, :mod:`.health`), and the routed
ensemble over peers (:mod:`.ensemble`, ``SwarmEnsemble``) with its sources (:mod:`.sources`) and the checks
on peers' answers (:mod:`.verifier` over the pure :mod:`.answer_checks`)."""

from diffswarm.utils.imports import defer_import

# before anything imports hivemind: its package __init__ imports hivemind.averaging, hence scipy.optimize, which
# the client never uses (~1/3 of hivemind's import time); it loads on first use instead (utils/imports.py)
defer_import("scipy.optimize")
