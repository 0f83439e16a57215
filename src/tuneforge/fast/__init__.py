"""The fast training path: fused LoRA, norm and MLP autograd functions, a cross-entropy that never
materialises the full logits, variable-length attention for packed rows and a recomputation
policy sized to the memory budget. ``path.enable`` applies what fits the model and says what it did.
"""
