"""Checkpoint -> standard HF/PEFT directories, and adapter + base -> merged model."""
