"""Evaluation of policy versions against references: `modalign eval` and the metrics it shares with the demo report."""
