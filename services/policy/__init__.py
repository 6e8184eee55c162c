"""The policy service: the multimodal policy model, batched sampling with behaviour log-probs, and serving."""
