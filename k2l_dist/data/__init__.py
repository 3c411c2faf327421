"""Datasets: readers of annotation formats, the synthetic generator, crops, and shards."""
