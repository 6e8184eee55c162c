"""Names of published model versions: policy "v<n>" and its reward model "r<n>", built and read here only.

The trainer numbers the policies it publishes v1, v2, ...; the policy it starts from (its reference,
which need not be in the model store) is v0. Each policy version is published with the reward model
of the same round, named r<n> after it, so the pair is found from either name. Operators may publish
versions under other names (the store accepts any safe name); those have no number.
"""

from __future__ import annotations

POLICY_PREFIX = "v"
REWARD_PREFIX = "r"


def policy_version(number: int) -> str:
    """The name of the n-th policy version the trainer publishes: policy_version(3) == "v3"."""
    if number < 0:
        raise ValueError(f"a version number is not negative, got {number}")
    return f"{POLICY_PREFIX}{number}"


STARTING_VERSION = policy_version(0)
"""The policy every deployment starts from, before any version is published."""


def version_number(name: str) -> int | None:
    """The number of a "v<n>" or "r<n>" name (version_number("v12") == 12); None for any other name."""
    digits = name[1:]
    if name[:1] in (POLICY_PREFIX, REWARD_PREFIX) and digits.isascii() and digits.isdigit():
        return int(digits)
    return None


def reward_version_for(policy: str) -> str:
    """The name of the reward model published with a numbered policy version: "v3" -> "r3"."""
    number = version_number(policy)
    if number is None or not policy.startswith(POLICY_PREFIX):
        raise ValueError(f"{policy!r} is not a numbered policy version (v<n>)")
    return f"{REWARD_PREFIX}{number}"


STARTING_REWARD_VERSION = reward_version_for(STARTING_VERSION)


def next_policy_version(*known: str) -> str:
    """The version after every numbered policy version among known: ("v1", "v4", "canary") -> "v5"."""
    numbers = [version_number(name) for name in known if name.startswith(POLICY_PREFIX)]
    return policy_version(max([0, *(n for n in numbers if n is not None)]) + 1)
