"""Find model weights, load them for training or chat, and wrap them with LoRA."""
