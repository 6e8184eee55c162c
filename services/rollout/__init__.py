"""The rollout controller: canary analysis, promotion and rollback of policy versions."""
