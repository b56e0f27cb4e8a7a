"""Running a whole swarm: a local swarm of peer processes on 127.0.0.1 (swarm up/down, demo, tests)."""
