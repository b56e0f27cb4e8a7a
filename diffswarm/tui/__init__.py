"""Terminal dashboard (Textual): watch the swarm and generate from it. Built on the swarm client."""
