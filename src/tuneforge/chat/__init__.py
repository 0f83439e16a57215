"""Generation and the terminal chat."""
