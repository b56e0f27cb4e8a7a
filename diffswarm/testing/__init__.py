"""Tools for tests, benchmarks and red-team runs: tiny real experts (toy) and hostile peers (hostile)."""
