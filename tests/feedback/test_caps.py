"""Per-user caps on a window's feedback (modalign.feedback.caps): pure logic."""

from __future__ import annotations

import pytest

from modalign.core.config import ConfigError, validate
from modalign.feedback.caps import UserCap, capped, kept_counts
from modalign.trainer.service import TrainerConfig


def test_users_who_give_alike_keep_everything_however_few_they_are() -> None:
    assert kept_counts({"a": 25, "b": 31, "c": 19, "d": 25}, UserCap()) == {"a": 25, "b": 31, "c": 19, "d": 25}
    assert kept_counts({"a": 40, "b": 12}, UserCap()) == {"a": 40, "b": 12}  # within 4x the other
    assert kept_counts({"alone": 1000}, UserCap()) == {"alone": 1000}  # nobody to protect


def test_a_flood_is_cut_to_the_largest_of_its_bounds() -> None:
    few = {"flood": 1000} | {f"user-{i}": 10 for i in range(4)}
    assert kept_counts(few, UserCap())["flood"] == 40  # 4x the median other user: more than 10% of 1040
    many = {"flood": 1000} | {f"user-{i}": 3 for i in range(500)}
    assert kept_counts(many, UserCap())["flood"] == 166  # 10% of what is kept: 166 / (166 + 1500)
    assert kept_counts({"flood": 1000, "quiet": 1}, UserCap())["flood"] == 8  # never below min_items
    assert kept_counts(few, UserCap(max_share=1.0))["flood"] == 1000  # the cap turned off


def test_two_floods_do_not_raise_each_others_cap() -> None:
    counts = {"flood-a": 1000, "flood-b": 1000} | {f"user-{i}": 10 for i in range(4)}
    kept = kept_counts(counts, UserCap())
    assert kept["flood-a"] == kept["flood-b"] == 40
    assert all(kept[f"user-{i}"] == 10 for i in range(4))


def test_a_users_first_items_are_kept_in_order_and_the_rest_counted() -> None:
    items = [("flood", n) for n in range(30)] + [("other", n) for n in range(5)] + [("flood", 30)]
    kept, dropped = capped(items, lambda item: item[0], UserCap(median_multiple=2, min_items=10))
    assert kept == [("flood", n) for n in range(10)] + [("other", n) for n in range(5)]
    assert dropped == {"flood": 21}


@pytest.mark.parametrize("settings", [{"max_share": 0.0}, {"max_share": 1.5}, {"median_multiple": -1}, {"min_items": -1}])
def test_a_cap_that_means_nothing_is_refused(settings: dict) -> None:
    with pytest.raises(ConfigError) as refused:
        validate(TrainerConfig(user_cap=UserCap(**settings)))
    assert refused.value.field == f"user_cap.{next(iter(settings))}"
