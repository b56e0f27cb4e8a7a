"""The swarm's DHT: bounds and strict field types (:mod:`.schema`), the records, each declared once
(:mod:`.records`: strict, signed, versioned, bounded), DHT keys, validators and entry parsing
(:mod:`.entries`), swarm names and owner-signed manifests (:mod:`.names`) and the node shell (:mod:`.node`)."""

from diffswarm.dht.entries import make_validators
from diffswarm.dht.names import SwarmName, SwarmNameError, parse_swarm_name
from diffswarm.dht.node import NetworkConfig, SwarmDHT
from diffswarm.dht.records import RECORD_VERSION, ExpertRecord, RouterProvider, SwarmManifest
from diffswarm.dht.schema import RecordError

__all__ = ["NetworkConfig", "SwarmDHT", "RECORD_VERSION", "ExpertRecord", "RecordError", "RouterProvider",
           "SwarmManifest", "SwarmName", "SwarmNameError", "make_validators", "parse_swarm_name"]
