"""What every plan shares: refusing an option without effect, the dataset options, full swarm names.

A plan (``diffswarm.cli.*_plans``) turns parsed options into the config objects the library runs on and
refuses, with a ``ValueError`` that names the option, every option that would have no effect in the
combination given (``given``: {dest: option string} of the options the user typed).
"""

from __future__ import annotations

from diffswarm.data import DatasetSpec


def refuse(given: dict[str, str], dests, why: str) -> None:
    """ValueError if any of ``dests`` was typed: '--x has no effect <why>'."""
    bad = [given[d] for d in dests if d in given]
    if bad:
        verb = "has" if len(bad) == 1 else "have"
        raise ValueError(f"{', '.join(bad)} {verb} no effect {why}")


def dataset(args) -> DatasetSpec:
    spec = DatasetSpec(args.dataset, args.data_root, args.size, args.channels)
    spec.resolved()  # refuse options the dataset would not honour, now
    return spec


DATASET_DESTS = ("dataset", "data_root", "size", "channels")


def full_swarm_name(text: str, option: str = "--swarm") -> str:
    """The canonical ``NAME@FINGERPRINT`` of ``text``, or a ValueError naming ``option`` that says how to get it."""
    from diffswarm.dht.names import SwarmNameError, parse_swarm_name

    try:
        return str(parse_swarm_name(text))
    except SwarmNameError as e:
        raise ValueError(f"{option}: {e}") from None
