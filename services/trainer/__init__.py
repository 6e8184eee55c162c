"""The online trainer's RLHF math: losses, KL estimators and advantage estimators as pure functions on tensors."""
