"""Sampling from a causal LM (batched, seeded, with KV caches): shared by `train` and `eval`."""
