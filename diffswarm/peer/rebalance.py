"""A serving peer's balance checks: every ``interval`` seconds it reads the swarm's expert records, asks the pure
``placement.rebalance_move`` whether its move would help, and confirms it over ``confirmations`` checks
(``RebalanceWatch``) before saying so, or, with ``--rebalance``, before leaving its cluster (``on_move``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from diffswarm.dht.node import SwarmDHT
from diffswarm.dht.records import SwarmManifest
from diffswarm.peer.placement import Move, RebalanceConfig, RebalanceWatch, coverage, rebalance_move

logger = logging.getLogger(__name__)


async def check_balance(dht: SwarmDHT, manifest: SwarmManifest | None, cfg: RebalanceConfig, mine: int,
                        watch: RebalanceWatch, log: Callable[[str], None]) -> Move | None:
    """One check: the confirmed move (None: none yet, or nothing to do); says what it sees."""
    if manifest is None or len(cfg.shares) != manifest.num_clusters:
        return None
    records, _ = await dht.get_experts(range(manifest.num_clusters))
    cover = coverage(records, manifest, cfg.shares)
    move = rebalance_move(cover, mine, cfg.threshold, cfg.margin)
    confirmed = watch.observe(move)
    if move is not None and confirmed is None:
        log(f"balance: {move.describe(cover)}; check {len(watch.seen)} of {cfg.confirmations} before "
            + ("moving" if cfg.move else "suggesting a move"))
    elif confirmed is not None and not cfg.move:
        log(f"balance: {confirmed.describe(cover)}, confirmed over {cfg.confirmations} checks: restart with "
            f"--rebalance (or --cluster {confirmed.dst}) to serve cluster {confirmed.dst} instead")
        watch.seen = []  # say it again only after another full confirmation
        return None
    return confirmed


async def watch_balance(dht_of: Callable[[], SwarmDHT | None], manifest_of: Callable[[], SwarmManifest | None],
                        cfg: RebalanceConfig, mine: int, stop: asyncio.Event, on_move: Callable[[Move], None],
                        log: Callable[[str], None]) -> None:
    """Check the balance every ``cfg.interval`` seconds until ``stop``; with ``cfg.move``, call ``on_move`` with the
    first confirmed move and return."""
    watch = RebalanceWatch(cfg.confirmations)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), cfg.interval)
        dht = dht_of()
        if stop.is_set() or dht is None:
            return
        try:
            move = await check_balance(dht, manifest_of(), cfg, mine, watch, log)
        except Exception as e:  # a DHT hiccup skips one check
            logger.debug(f"balance check failed: {e!r}")
            continue
        if move is not None and cfg.move:
            log(f"balance: moving from cluster {move.src} to cluster {move.dst} (quality {move.before:.2f} -> "
                f"{move.after:.2f}, confirmed over {cfg.confirmations} checks {cfg.interval:g} s apart)")
            on_move(move)
            return
