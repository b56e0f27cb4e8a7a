"""diffswarm: decentralized diffusion. Experts train alone; a router mixes them at sampling time."""

__version__ = "0.1.0"
