"""Policy optimisation algorithms, registered by name: one module each, one function per algorithm.

An algorithm takes the learner, the round's new preference pairs and the prompts seen in traffic,
updates learner.policy, and returns its metrics. Adding one is writing that function and decorating it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from modalign.trainer.registry import registrar

if TYPE_CHECKING:
    from modalign.trainer.join import PreferencePair
    from modalign.trainer.learner import Learner, Prompt

PolicyAlgorithm = Callable[["Learner", "list[PreferencePair]", "list[Prompt]"], dict[str, float]]
ALGORITHMS: dict[str, PolicyAlgorithm] = {}


register_algorithm = registrar(ALGORITHMS, "policy algorithm")


# Importing the modules registers their algorithms.
from modalign.trainer.algorithms import critic_free, dpo, ppo  # noqa: E402,F401
