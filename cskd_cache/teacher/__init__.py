"""The CNN teacher (dense and global logits), fitting it to a dataset, and stage one: precompute."""
