"""Measure what fine-tuning did: identity named where asked, and nowhere else."""
