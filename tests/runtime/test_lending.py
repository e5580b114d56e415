"""How a loan is sized and split over creditors (lending.py; the engine and the simulator use it)."""

from __future__ import annotations

from infinillm.lending import BORROW_AHEAD, MIN_PART_TOKENS, loan_size, part_limit, plan_loan


def test_a_loan_takes_a_few_blocks_ahead_but_never_past_the_request_maximum():
    assert loan_size(3, 100, 10) == 3 + BORROW_AHEAD
    assert loan_size(3, 14, 10) == 4  # only 4 more blocks can ever be needed
    assert loan_size(3, 11, 10) == 3  # never less than the shortfall


def test_part_limit_is_the_request_share_of_the_cluster_and_at_least_min_part_tokens():
    assert part_limit(10, 4, 16) == MIN_PART_TOKENS // 16
    assert part_limit(125_000, 32, 16) == 3907  # a 2M-token request over 32 instances
    assert part_limit(125_000, 0, 16) == 125_000


def test_present_creditors_first_up_to_the_limit_then_new_ones_most_room_first():
    offers = [(1, 100), (2, 50), (3, 80)]
    # Request already on 2 (10 blocks), limit 30: 20 more there, then the rest on the roomiest new one.
    assert plan_loan(45, offers, {2: 10}, 30) == [(2, 20), (1, 25)]
    # A small loan stays on the present creditor.
    assert plan_loan(5, offers, {2: 10}, 30) == [(2, 5)]
    # Past every limit: the present creditors again before anything is left unlent.
    assert plan_loan(200, offers, {2: 10}, 30) == [(2, 50), (1, 100), (3, 50)]


def test_a_long_request_spreads_over_many_creditors():
    offers = [(i, 1000) for i in range(1, 8)]
    plan = plan_loan(1400, offers, {}, 200)
    assert [k for _, k in plan] == [200] * 7
    assert sum(k for _, k in plan_loan(100, [(1, 0), (2, 0)], {}, 50)) == 0  # nobody can lend: nothing planned


def test_a_refusing_creditor_share_goes_to_the_others():
    from infinillm.lending import borrow

    asked = []

    def ask(i, k):
        asked.append((i, k))
        return i != 1  # instance 1 refuses (its room went, or it died)

    # 1 has the most room, so it is asked first for the whole loan; it refuses; 2 and 3 share it.
    assert borrow(30, [(1, 100), (2, 20), (3, 15)], {}, 1000, ask) == 30
    assert asked == [(1, 30), (2, 20), (3, 10)]
    asked.clear()
    assert borrow(30, [(1, 100)], {}, 1000, ask) == 0  # nobody else: nothing granted, no loop
    assert asked == [(1, 30)]
