"""Evaluation: features, weighted kNN, the fast and the paper's linear probes, the kNN
monitor during training, and t-SNE."""
