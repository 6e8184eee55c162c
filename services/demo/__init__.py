"""The demo (`modalign demo`): a synthetic cross-modal task with ground truth (scenes), its warm-started
v0 (warmstart), simulated users who speak gRPC (users), the loop itself (run), and its report (report)."""
