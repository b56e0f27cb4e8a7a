"""The router and sampling: the router model and its training (:mod:`.model`, :mod:`.train`), pure routing
strategies (:mod:`.routing`), samplers and the routed ensemble (:mod:`.sampler`), and local ensembles of
checkpoints (:mod:`.local`)."""
