"""Benchmarks: each module has ``main(argv) -> int`` and prints tables; ``python -m bench.run_all``."""
