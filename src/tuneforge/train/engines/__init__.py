"""The engines a step runs through: one process, data parallel, FSDP2, DeepSpeed ZeRO. Each is a
class with the same few methods (engines/base.py); the recipe picks one at setup."""
