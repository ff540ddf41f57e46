"""Training data: shard discovery and reading, augmentation, the batch stream."""
