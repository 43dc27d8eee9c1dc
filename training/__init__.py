"""Composes model/, data/ and sharding/ into training: state, step, optimizer, checkpoints, hooks."""
