"""Inter-annotator agreement over rankings: pure functions, no database.

Every function takes `rankings_by_item`: item key -> {annotator: ranking}, where a ranking
is a list of groups, best group first, and a group lists response_ids that are tied, e.g.
`[["r2"], ["r0", "r3"], ["r1"]]`. Items with fewer than two annotators say nothing about
agreement and are ignored.

Ties, in the pairwise measures: for one response pair, two orders agree when they put the
same response above the other. A tie against a strict order counts as a disagreement (one
annotator saw a difference the other did not). A tie against a tie is left out, because
it says nothing about which response is better, which is what the % measures.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import Hashable, Mapping, Sequence

Ranking = Sequence[Sequence[str]]
RankingsByItem = Mapping[Hashable, Mapping[str, Ranking]]


@dataclass(frozen=True)
class PairwiseAgreement:
    """`agree` of `total` comparisons ordered a response pair the same way; rate is None when total is 0."""

    agree: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.agree / self.total if self.total else None


def midranks(ranking: Ranking) -> dict[str, float]:
    """1-based fractional ranks: a tied group filling positions p+1 .. p+g gets p + (g+1)/2 each.

    `[["a"], ["b", "c"], ["d"]]` -> a 1, b 2.5, c 2.5, d 4. Mid-ranks keep the positions
    of responses outside a tie unchanged, so "d is last of four" means rank 4 whether or
    not b and c were tied.
    """
    ranks, position = {}, 0
    for group in ranking:
        for rid in group:
            ranks[rid] = position + (len(group) + 1) / 2
        position += len(group)
    return ranks


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _compare(order_1: int, order_2: int, counts: list[int]) -> None:
    """Add one comparison of two orders (+1 first above, -1 below, 0 tie) to counts [agree, total]."""
    if order_1 == 0 and order_2 == 0:
        return  # tie vs tie: no information about order (see the module docstring)
    counts[0] += order_1 == order_2
    counts[1] += 1


def _multi_annotated(rankings_by_item: RankingsByItem):
    """(annotators sorted, their mid-ranks, the response ids all of them ranked) per item with >= 2 annotators."""
    for by_annotator in rankings_by_item.values():
        if len(by_annotator) < 2:
            continue
        annotators = sorted(by_annotator)
        ranks = {a: midranks(by_annotator[a]) for a in annotators}
        shared = set.intersection(*(set(r) for r in ranks.values()))
        yield annotators, ranks, sorted(shared)


def pairwise_agreement(rankings_by_item: RankingsByItem) -> PairwiseAgreement:
    """Share of (annotator pair, response pair) comparisons in which both order the pair the same way.

    Pooled over all items: every pair of annotators of an item compares every pair of its
    responses once. Tie rules as in the module docstring. InstructGPT reports this
    measure as 72.6 ± 1.5% between its training labelers (Ouyang et al. 2022, "Training language
    models to follow instructions with human feedback").
    """
    counts = [0, 0]
    for annotators, ranks, ids in _multi_annotated(rankings_by_item):
        for a1, a2 in combinations(annotators, 2):
            r1, r2 = ranks[a1], ranks[a2]
            for x, y in combinations(ids, 2):
                _compare(_sign(r1[y] - r1[x]), _sign(r2[y] - r2[x]), counts)
    return PairwiseAgreement(*counts)


def agreement_with_consensus(rankings_by_item: RankingsByItem) -> dict[str, PairwiseAgreement]:
    """Per annotator: how often their order of a response pair matches the others' consensus.

    The consensus of an item, for annotator A, is each response's mean mid-rank across the
    item's other annotators (A left out, so A cannot agree with themselves); the consensus
    order of a pair is the order of those means, a tie when they are equal. Comparisons
    follow the tie rules of the module docstring.
    """
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for annotators, ranks, ids in _multi_annotated(rankings_by_item):
        for a in annotators:
            others = [b for b in annotators if b != a]
            # Sums, not means: same denominator, so comparing them is exact in floating point.
            consensus = {rid: sum(ranks[b][rid] for b in others) for rid in ids}
            for x, y in combinations(ids, 2):
                _compare(_sign(ranks[a][y] - ranks[a][x]), _sign(consensus[y] - consensus[x]), counts[a])
    return {a: PairwiseAgreement(*c) for a, c in sorted(counts.items())}


def krippendorff_alpha_ordinal(rankings_by_item: RankingsByItem) -> float | None:
    """Krippendorff's alpha with the ordinal metric, over rank positions. None when undefined.

    Data: a unit is one response of one item; its values are the mid-ranks the item's
    annotators gave it (see `midranks`). Following Krippendorff (2011), "Computing
    Krippendorff's Alpha-Reliability", sections B and C:

      coincidences   o_ck = sum over units u of (number of ordered pairs of values (c, k)
                            from different annotators in u) / (m_u - 1), m_u = values in u
      marginals      n_c = sum_k o_ck,   n = sum_c n_c
      ordinal metric delta²_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2)²   for c <= k
                     (symmetric; values g ordered by rank)
      alpha          1 - D_o / D_e = 1 - (n - 1) * sum_ck o_ck delta²_ck / sum_ck n_c n_k delta²_ck

    Alpha is 1 for perfect agreement and about 0 when rankings are unrelated. It is
    undefined (None) when no unit has two values or every value is the same (D_e = 0).
    """
    coincidences: dict[tuple[float, float], float] = defaultdict(float)
    for annotators, ranks, ids in _multi_annotated(rankings_by_item):
        m = len(annotators)
        for rid in ids:
            values = [ranks[a][rid] for a in annotators]
            for i, c in enumerate(values):
                for j, k in enumerate(values):
                    if i != j:
                        coincidences[c, k] += 1 / (m - 1)
    marginals: dict[float, float] = defaultdict(float)
    for (c, _k), o in coincidences.items():
        marginals[c] += o
    n = sum(marginals.values())
    if n < 2:
        return None
    values = sorted(marginals)
    # cumulative[i] = n of all values ranked before values[i], so a run sum is a difference.
    cumulative = [0.0]
    for v in values:
        cumulative.append(cumulative[-1] + marginals[v])
    index = {v: i for i, v in enumerate(values)}

    def delta2(c: float, k: float) -> float:
        lo, hi = sorted((index[c], index[k]))
        run = cumulative[hi + 1] - cumulative[lo]
        return (run - (marginals[values[lo]] + marginals[values[hi]]) / 2) ** 2

    observed = sum(o * delta2(c, k) for (c, k), o in coincidences.items())
    expected = sum(marginals[c] * marginals[k] * delta2(c, k) for c in values for k in values)
    if expected == 0:
        return None
    return 1 - (n - 1) * observed / expected
