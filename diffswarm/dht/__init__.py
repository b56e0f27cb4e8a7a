"""DHT records (:mod:`.records`: strict, signed, versioned, bounded), swarm names and owner-signed
manifests (:mod:`.trust`) and the node shell (:mod:`.node`)."""

from diffswarm.dht.names import SwarmName, SwarmNameError, parse_swarm_name
from diffswarm.dht.node import NetworkConfig, SwarmDHT
from diffswarm.dht.records import (
    RECORD_VERSION,
    ExpertRecord,
    RecordError,
    RouterProvider,
    SwarmManifest,
    make_validators,
)

__all__ = ["NetworkConfig", "SwarmDHT", "RECORD_VERSION", "ExpertRecord", "RecordError", "RouterProvider",
           "SwarmManifest", "SwarmName", "SwarmNameError", "make_validators", "parse_swarm_name"]
