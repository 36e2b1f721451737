"""Self-contained jobs that run offline: the embedded default and small demonstrations."""
