"""The volunteer peer: wire protocol (:mod:`.protocol`), batching (:mod:`.batching`), the server and its
lifecycle (:mod:`.server`), and local swarms of peer processes (:mod:`.launch`)."""
