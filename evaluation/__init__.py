"""Metrics for textual inversion: the paper's CLIP similarities and the toy shapes evaluator."""
