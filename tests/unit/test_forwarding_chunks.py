"""How a worker's assignments are cut into stream writes under the message size limit."""

from __future__ import annotations

import pytest

from sluicegate_dispatcher.forwarding import _chunks


@pytest.mark.parametrize(
    ("sizes", "budget", "runs"),
    [
        ([], 10, []),
        ([3, 3, 3], 10, [(0, 3)]),
        ([4, 4, 4], 8, [(0, 2), (2, 3)]),
        ([9, 9, 9], 10, [(0, 1), (1, 2), (2, 3)]),
        ([20], 10, [(0, 1)]),  # one item over the budget still goes, alone
        ([1, 20, 1], 10, [(0, 1), (1, 2), (2, 3)]),
        ([5, 5, 5, 5], 10, [(0, 2), (2, 4)]),
    ],
)
def test_runs_stay_within_the_budget_and_keep_the_order(
    sizes: list[int], budget: int, runs: list[tuple[int, int]]
) -> None:
    assert _chunks(sizes, budget) == runs
    covered = [i for start, end in runs for i in range(start, end)]
    assert covered == list(range(len(sizes))), "every item once, in order"
