"""The router: the router model and its training (:mod:`.model`, :mod:`.train`), pure routing strategies
(:mod:`.routing`), the statistics router (:mod:`.stats`), the routed ensemble of experts (:mod:`.ensemble`), and
local ensembles of checkpoints (:mod:`.local`)."""
