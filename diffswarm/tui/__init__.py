"""Terminal dashboard (Textual), built on the swarm client: pure view models (:mod:`.model`), the data source
(:mod:`.source`: a live swarm or a deterministic fake), small widgets (:mod:`.widgets`), the generation
worker (:mod:`.generation`) and the app shell (:mod:`.app`)."""
