"""Offline, procedurally generated tasks for the demo, the tests and the paper-replication sweeps.

Each task ships its data as a `datasets.DatasetDict` in a row layout that `gkd_jax.rows` reads, a HuggingFace
tokenizer saved to disk (so runs load it with `AutoTokenizer.from_pretrained`, like a real model's) and an
exact checker for model outputs.

  arithmetic   sums of a few small numbers, answered as a chain of running partial sums.
"""
