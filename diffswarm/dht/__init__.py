"""DHT records (:mod:`.records`: strict, signed, versioned) and the node shell (:mod:`.node`)."""

from diffswarm.dht.node import NetworkConfig, SwarmDHT
from diffswarm.dht.records import (
                                   PROTOCOL_VERSION,
                                   RECORD_VERSION,
                                   ExpertRecord,
                                   RecordError,
                                   SwarmRecord,
                                   make_validators,
)

__all__ = ["NetworkConfig", "SwarmDHT", "PROTOCOL_VERSION", "RECORD_VERSION", "ExpertRecord", "RecordError",
           "SwarmRecord", "make_validators"]
