"""The wire contract that peer and client share: RPC names, versions, message layout, limits and checks."""
