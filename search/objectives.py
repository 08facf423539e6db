"""What a finished trial reports, and so what a search may optimise or constrain."""

__all__ = ["OBJECTIVES", "DIRECTIONS"]

# The trial result contract of DESIGN.md; anything else is a typo that would silently never be reported.
OBJECTIVES = ("metric", "metric_drop", "size_bytes", "params", "latency_ms_b1", "latency_ms_b32", "train_seconds")
DIRECTIONS = ("max", "min")
