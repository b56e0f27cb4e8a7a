"""The models of one ``diffswarm eval`` run: the pool's experts, monoliths and routers, each loaded once,
and each network's forward FLOPs, counted once."""

from __future__ import annotations

from diffswarm.eval.ablations import NoTranslator, router_flops, velocity_flops
from diffswarm.eval.settings import Cell, ensemble_objectives
from diffswarm.experts.expert import seen_classes
from diffswarm.router.ensemble import RoutedEnsemble
from diffswarm.router.routing import RoutingConfig


class ModelCache:
    """Models of an :class:`~diffswarm.eval.pool.ExpertPool` on ``device``, by (kind, training seed, ...)."""

    def __init__(self, pool, device, k: int, shape: tuple[int, ...], num_classes: int):
        self.pool, self.device, self.k, self.shape, self.num_classes = pool, device, k, shape, num_classes
        self._models: dict = {}
        self._flops: dict = {}

    def _cached(self, key, make):
        if key not in self._models:
            self._models[key] = make()
        return self._models[key]

    def experts(self, train_seed: int, ensemble: str) -> list:
        objs = ensemble_objectives(ensemble, self.k)
        return [self._cached(("expert", train_seed, o, c), lambda o=o, c=c: self._expert(train_seed, o, c))
                for c, o in enumerate(objs)]

    def _expert(self, train_seed: int, objective: str, cluster: int):
        """A cluster's expert; one from a pool trained before checkpoints recorded their class histogram gets
        its cluster's (the partition's), so it too answers absent classes unconditionally."""
        e = self.pool.expert(train_seed, objective, cluster, self.device)
        if e.seen_classes is None:
            hist = [int(c) for c in self.pool.partition.cluster_summary[cluster]["class_hist"]]
            e.seen_classes = seen_classes(hist, e.config.net.num_classes)
        return e

    def monolith(self, train_seed: int, objective: str = "fm"):
        return self._cached(("monolith", train_seed, objective),
                            lambda: self.pool.expert(train_seed, objective, None, self.device))

    def router(self, train_seed: int, name: str):
        if name.startswith("stats"):
            return self._cached(("stats",), lambda: self.pool.stats_router(self.device))
        return self._cached(("router", train_seed, name), lambda: self.pool.router(train_seed, name, self.device))

    def ensemble(self, cell: Cell, routing: RoutingConfig) -> RoutedEnsemble:
        experts = self.experts(cell.train_seed, cell.ensemble)
        if cell.method.startswith("no-translator"):  # no-translator (all three errors) | no-translator:<one error>
            experts = [NoTranslator(e, cell.method.partition(":")[2] or "all") for e in experts]
        return RoutedEnsemble(experts, self.router(cell.train_seed, cell.router), routing,
                              seed=cell.seed, router_sees_labels=cell.router in ("cond", "stats"))

    def flops_of(self, key, make_model, kind: str, guidance: float = 1.0) -> int:
        key = (*key, guidance)
        if key not in self._flops:
            m = make_model()
            if kind == "router":
                self._flops[key] = router_flops(m, self.shape, self.device)
            else:
                self._flops[key] = velocity_flops(m, self.shape, guidance, self.num_classes, self.device)
        return self._flops[key]


__all__ = ["ModelCache"]
