"""The fast training path: fused LoRA, norm and MLP autograd functions, a cross-entropy that never
materialises the full logits, variable-length attention for packed rows, a recomputation
policy sized to the memory budget and compiled decoder layers. ``apply`` makes every patch that
fits the model and returns what it changed.
"""

from tuneforge.fast.apply import Target, apply

__all__ = ["Target", "apply"]
