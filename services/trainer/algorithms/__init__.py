"""Policy optimisation algorithms, registered by name: one module each, one function per algorithm.

An algorithm is a function (context, pairs, prompts) -> metrics: it updates the policy through the
PolicyContext it is given (see context.py: exactly what an algorithm may use), from the round's new
preference pairs (off-policy algorithms) or from responses it samples to the prompts seen in traffic
(on-policy ones), and returns its metrics. Adding one is writing that function in a module here,
decorating it, and importing the module below; `--learner.algorithm` accepts every registered name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from modalign.trainer.registry import registrar

if TYPE_CHECKING:
    from modalign.trainer.algorithms.context import PolicyContext
    from modalign.trainer.batches import Prompt
    from modalign.trainer.join import PreferencePair

PolicyUpdate = Callable[["PolicyContext", "list[PreferencePair]", "list[Prompt]"], "dict[str, float]"]


@dataclass(frozen=True)
class PolicyAlgorithm:
    name: str
    update: PolicyUpdate
    uses_critic: bool
    """The learner builds a critic (a value model, started from the reward model) only when this is set."""


ALGORITHMS: dict[str, PolicyAlgorithm] = {}
_register = registrar(ALGORITHMS, "policy algorithm")


def register_algorithm(name: str, *, uses_critic: bool = False) -> Callable[[PolicyUpdate], PolicyUpdate]:
    """Decorator that registers a policy update function under name."""

    def register(update: PolicyUpdate) -> PolicyUpdate:
        _register(name)(PolicyAlgorithm(name, update, uses_critic))
        return update

    return register


# Importing the modules registers their algorithms.
from modalign.trainer.algorithms import a2c, critic_free, dpo, ppo  # noqa: E402,F401
