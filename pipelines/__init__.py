"""Data streams, the training loop and the CLI: the only layer that wires cae2 and targets together."""
