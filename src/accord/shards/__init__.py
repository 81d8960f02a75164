"""Shard building: raw media + captions -> validated WebDataset tar shards."""
