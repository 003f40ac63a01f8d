"""Datasets: a registry of named datasets, manifest-backed image loading, the generated mini-world."""
