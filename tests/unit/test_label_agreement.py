"""Agreement over rankings, against values worked out by hand (arithmetic in the comments)."""

from __future__ import annotations

import random

import pytest

from labeling_app.agreement import agreement_with_consensus, krippendorff_alpha_ordinal, midranks, pairwise_agreement

# One item, responses a b c, three annotators; Z ties a and b.
X = [["a"], ["b"], ["c"]]
Y = [["a"], ["c"], ["b"]]
Z = [["a", "b"], ["c"]]


def test_midranks_give_tied_responses_the_mean_of_their_positions():
    assert midranks(X) == {"a": 1, "b": 2, "c": 3}
    assert midranks(Z) == {"a": 1.5, "b": 1.5, "c": 3}
    assert midranks([["a"], ["b", "c", "d"], ["e"]]) == {"a": 1, "b": 3, "c": 3, "d": 3, "e": 5}


def test_pairwise_agreement_by_hand():
    # X vs Y: ab agree, ac agree, bc disagree (X b>c, Y c>b)            -> 2 of 3
    # X vs Z: ab disagree (X a>b, Z tie: tie vs order), ac agree, bc agree -> 2 of 3
    # Y vs Z: ab disagree (tie vs order), ac agree, bc disagree          -> 1 of 3
    # item 2: both tie a and b, tie vs tie is left out                    -> 0 of 0
    # item 3: one annotator, ignored.                           Total: 5 of 9
    result = pairwise_agreement({1: {"X": X, "Y": Y, "Z": Z}, 2: {"X": [["a", "b"]], "Y": [["b", "a"]]}, 3: {"X": X}})
    assert (result.agree, result.total) == (5, 9)
    assert result.rate == pytest.approx(5 / 9)


def test_agreement_with_consensus_by_hand():
    # Mid-ranks: X a1 b2 c3; Y a1 b3 c2; Z a1.5 b1.5 c3.
    # For X, the others' (Y+Z) rank sums: a 2.5, b 4.5, c 5 -> a>b, a>c, b>c; X agrees on all 3.
    # For Y, X+Z: a 2.5, b 3.5, c 6 -> a>b, a>c, b>c; Y has c>b -> 2 of 3.
    # For Z, X+Y: a 2, b 5, c 5 -> a>b, a>c, b=c; Z ties a,b (vs a>b: disagree), a>c agrees,
    #   Z has b>c against a consensus tie (disagree)                      -> 1 of 3.
    result = agreement_with_consensus({1: {"X": X, "Y": Y, "Z": Z}})
    assert {a: (r.agree, r.total) for a, r in result.items()} == {"X": (3, 3), "Y": (2, 3), "Z": (1, 3)}


def test_krippendorff_alpha_two_annotators_by_hand():
    # Units (responses) a b c, values X: 1 2 3, Y: 1 3 2. With m_u = 2 every ordered pair
    # weighs 1: o11 = 2 (unit a), o23 = o32 = 2 (units b and c). n1 = n2 = n3 = 2, n = 6.
    # Ordinal delta² = (sum of n_g from c to k - (n_c + n_k)/2)²:
    #   d(1,2) = (4 - 2)² = 4, d(2,3) = (4 - 2)² = 4, d(1,3) = (6 - 2)² = 16.
    # sum o·d = 2·4 + 2·4 = 16; sum n_c n_k d over ordered pairs = 2·(2·2·4 + 2·2·4 + 2·2·16) = 192.
    # alpha = 1 - (n - 1)·16/192 = 1 - 80/192 = 7/12.
    assert krippendorff_alpha_ordinal({1: {"X": X, "Y": Y}}) == pytest.approx(7 / 12)


def test_krippendorff_alpha_three_annotators_with_a_tie_by_hand():
    # Values: a (1, 1, 1.5), b (2, 3, 1.5), c (3, 2, 3); m_u = 3, so each ordered pair weighs 1/2.
    # Coincidences: o(1,1) = 1, o(1,1.5) = o(1.5,1) = 1; o(2,3) = o(3,2) = 1.5; o(2,1.5) = o(1.5,2) = .5;
    #   o(3,1.5) = o(1.5,3) = .5; o(3,3) = 1.
    # Marginals: n1 = 2, n1.5 = 2, n2 = 2, n3 = 3; n = 9.
    # delta²: (1,1.5) (4-2)² = 4; (1,2) (6-2)² = 16; (1,3) (9-2.5)² = 42.25; (1.5,2) (4-2)² = 4;
    #   (1.5,3) (7-2.5)² = 20.25; (2,3) (5-2.5)² = 6.25.
    # Observed: 2·4 + 3·6.25 + 1·4 + 1·20.25 = 51.
    # Expected: 2·(2·2·4 + 2·2·16 + 2·3·42.25 + 2·2·4 + 2·3·20.25 + 2·3·6.25) = 2·508.5 = 1017.
    # alpha = 1 - 8·51/1017 = 609/1017 ≈ 0.5988.
    assert krippendorff_alpha_ordinal({1: {"X": X, "Y": Y, "Z": Z}}) == pytest.approx(609 / 1017)


def test_perfect_agreement_gives_alpha_one_and_full_pairwise_agreement():
    by_item = {i: {a: [["r1"], ["r0", "r3"], ["r2"]] for a in ("p", "q", "r")} for i in range(5)}
    assert krippendorff_alpha_ordinal(by_item) == pytest.approx(1.0)
    assert pairwise_agreement(by_item).rate == 1.0
    assert all(r.rate == 1.0 for r in agreement_with_consensus(by_item).values())


def test_unrelated_rankings_agree_at_chance():
    rng = random.Random(0)
    by_item = {}
    for i in range(300):
        by_item[i] = {}
        for annotator in ("p", "q", "r"):
            order = ["r0", "r1", "r2", "r3"]
            rng.shuffle(order)
            by_item[i][annotator] = [[rid] for rid in order]
    # 300 items x 3 annotator pairs x 6 response pairs = 5400 comparisons: the SE of a 50% rate is 0.7%.
    assert pairwise_agreement(by_item).rate == pytest.approx(0.5, abs=0.03)
    assert krippendorff_alpha_ordinal(by_item) == pytest.approx(0.0, abs=0.05)


def test_agreement_is_undefined_without_two_annotators_or_any_variation():
    assert pairwise_agreement({1: {"X": X}}).rate is None
    assert krippendorff_alpha_ordinal({1: {"X": X}}) is None
    assert krippendorff_alpha_ordinal({1: {"X": [["a", "b"]], "Y": [["a", "b"]]}}) is None  # every value 1.5
    assert agreement_with_consensus({}) == {}
