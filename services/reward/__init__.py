"""The reward service: a multimodal reward model (model.py) behind KServe's Open Inference Protocol v2 (server.py)."""
