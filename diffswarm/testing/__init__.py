"""Tools for tests, benchmarks and red-team runs: tiny real experts (toy), hostile peers (hostile).

Not for production."""
