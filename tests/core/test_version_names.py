"""Version names are built and read in one place."""

from __future__ import annotations

import pytest

from modalign.core.version_names import (
    STARTING_REWARD_VERSION,
    STARTING_VERSION,
    next_policy_version,
    policy_version,
    reward_version_for,
    version_number,
)


def test_policy_and_reward_names_round_trip_through_their_number() -> None:
    assert (STARTING_VERSION, STARTING_REWARD_VERSION) == ("v0", "r0")
    assert policy_version(12) == "v12" and version_number("v12") == 12 and version_number("r12") == 12
    assert reward_version_for(policy_version(7)) == "r7"
    for other in ("canary", "v", "v1a", "x3", "v-1", "v١"):  # the last is an Arabic-Indic digit
        assert version_number(other) is None, other
    with pytest.raises(ValueError, match="not a numbered policy version"):
        reward_version_for("r3")
    with pytest.raises(ValueError):
        policy_version(-1)


def test_the_next_version_follows_every_numbered_policy_version_known() -> None:
    assert next_policy_version() == "v1"
    assert next_policy_version("v0") == "v1"
    assert next_policy_version("v2", "v10", "v9") == "v11"  # numerically, not as text
    assert next_policy_version("canary", "r40", "v3") == "v4"  # names without a policy number are ignored
