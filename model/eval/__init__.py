"""Evaluation on frozen features: kNN (and, later, linear probes)."""
