"""One expert's whole life, importable without hivemind: the conventions and VP schedules (:mod:`.schedules`),
the denoiser networks (:mod:`.networks`), what an expert is (:mod:`.config`: ``ExpertConfig``, ``OBJECTIVES``),
the training objectives (:mod:`.objectives`), the eps -> velocity translator (:mod:`.translator`), the adapter
that answers the one ``velocity`` contract (:mod:`.expert`), self-describing checkpoints (:mod:`.checkpoint`)
and training with resumption (:mod:`.train`)."""
