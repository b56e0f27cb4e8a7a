"""DHT records (:mod:`.records`: strict, signed, versioned) and the node shell (:mod:`.node`)."""

from diffswarm.dht.node import NetworkConfig, SwarmDHT
from diffswarm.dht.records import RECORD_VERSION, ExpertRecord, RecordError, SwarmRecord, make_validators

__all__ = ["NetworkConfig", "SwarmDHT", "RECORD_VERSION", "ExpertRecord", "RecordError", "SwarmRecord",
           "make_validators"]
