"""Tiny models and synthetic batches that the tests, the benchmarks and the CLI share (`tiny_models`)."""
