"""The swarm client: pure replica selection and bans (:mod:`.selection`), the swarm view
(:mod:`.discovery`), the network shell (:mod:`.client`) and the routed ensemble over peers
(:mod:`.ensemble`, ``SwarmEnsemble``)."""
