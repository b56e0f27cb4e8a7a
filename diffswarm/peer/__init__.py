"""The volunteer peer: its lifecycle (:mod:`.server`: start, train while joining (:mod:`.joining`), serve,
shutdown) and configuration (:mod:`.config`); what it hosts (:mod:`.hosted`: experts and the router file);
the RPC handlers (:mod:`.servicer`) over the RPC plumbing and error answers (:mod:`.rpc`), bounded stream
framing (:mod:`.streams`), caller limits (:mod:`.limits`) and request batching (:mod:`.batching`); and what
it announces in the DHT (:mod:`.announce`: records, the owner's manifest, the heartbeat)."""
