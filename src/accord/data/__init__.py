"""Streaming data: shards -> decoded samples -> batches."""
