"""Exit policies on hand-made score arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from matryoshka.errors import OptionError
from matryoshka.plugin.policies import (
    CandidatePolicy,
    FixedPolicy,
    QueryPolicy,
    StageView,
    TopKPolicy,
    check_threshold,
    make_policy,
    sigmoid,
)


def view(scores: list[float], alive: list[int] | None = None, groups: list[int] | None = None, exit_layer: int = 2,
         residual_std: float = 0.0) -> StageView:
    n = len(scores)
    return StageView(0, exit_layer, residual_std, np.arange(n) if alive is None else np.array(alive),
                     np.array(scores, dtype=np.float64), np.zeros(n, np.int64) if groups is None else np.array(groups))


def test_sigmoid_is_stable_and_symmetric() -> None:
    x = np.array([-1000.0, -2.0, 0.0, 2.0, 1000.0])
    p = sigmoid(x)
    assert np.all(np.isfinite(p)) and p[2] == 0.5 and p[0] == 0.0 and p[4] == 1.0
    assert np.allclose(p + sigmoid(-x), 1.0)


def test_candidate_policy_confidence_rule() -> None:
    # sigmoid(2.2) = 0.900, sigmoid(-3) = 0.047 (confidence 0.953), sigmoid(0.1) = 0.525
    decided = CandidatePolicy(0.9).decide(view([2.2, -3.0, 0.1, 2.19]))
    assert decided.tolist() == [True, True, False, False]
    assert CandidatePolicy(0.0).decide(view([0.0, 5.0])).tolist() == [True, True]


def test_candidate_policy_only_decides_alive_rows() -> None:
    decided = CandidatePolicy(0.9).decide(view([10.0, 0.0, -10.0, 0.0], alive=[1, 2]))
    assert decided.tolist() == [False, True]


@pytest.mark.parametrize("policy", [CandidatePolicy(1.0), QueryPolicy(1.0), TopKPolicy(1.0, k=1)])
def test_threshold_one_never_exits_even_when_saturated(policy) -> None:
    # sigmoid(1000) and softmax([1000, 0]) are exactly 1.0 in floating point
    assert not policy.decide(view([1000.0, 0.0, -1000.0], groups=[0, 0, 0], residual_std=0.0)).any()


def test_query_policy_exits_whole_queries() -> None:
    scores = [5.0, 0.0, 0.0, 1.0, 1.0, 1.0, 3.0]
    groups = [0, 0, 0, 1, 1, 1, 2]
    decided = QueryPolicy(0.9).decide(view(scores, groups=groups))
    # query 0: softmax max = e^5 / (e^5 + 2) = 0.987 > 0.9; query 1: 1/3; query 2 (one candidate): 1.0
    assert decided.tolist() == [True, True, True, False, False, False, True]


def test_query_policy_uses_only_alive_candidates_of_a_query() -> None:
    decided = QueryPolicy(0.6).decide(view([9.0, 0.0, 0.5], alive=[1, 2], groups=[0, 0, 0]))
    p = math.exp(0.5) / (math.exp(0.5) + 1.0)  # 0.62 over the two alive ones (the exited 9.0 is not counted)
    assert p > 0.6 and decided.tolist() == [True, True]


def test_topk_margin_is_scaled_residual_std() -> None:
    policy = TopKPolicy(0.95, k=2)
    assert policy.margin(2.0) == pytest.approx(2.0 * 1.6448536, rel=1e-6)
    assert TopKPolicy(0.5).margin(2.0) == 0.0 and TopKPolicy(0.2).margin(2.0) == 0.0
    assert TopKPolicy(1.0).margin(0.1) == math.inf


def test_topk_prunes_candidates_that_cannot_reach_the_top_k() -> None:
    scores = [5.0, 4.0, 3.9, 1.0, 3.5, 9.0, 8.0, 0.0]
    groups = [0, 0, 0, 0, 0, 1, 1, 1]
    # query 0: 2nd best = 4.0; margin = 1.0 * z(0.8413) = 1.0 -> exit when s + 1 < 4 (1.0 only; 3.5 + 1 >= 4)
    # query 1 has 3 candidates > k = 2: 2nd best 8.0 -> 0.0 exits
    decided = TopKPolicy(0.8413447, k=2).decide(view(scores, groups=groups, residual_std=1.0))
    assert decided.tolist() == [False, False, False, True, False, False, False, True]
    # a query with k or fewer candidates never exits early
    assert not TopKPolicy(0.9, k=3).decide(view([5.0, -50.0, 1.0], residual_std=0.0)).any()


def test_topk_counts_exited_candidates_in_the_kth_best() -> None:
    # candidate 0 exited earlier with 10; alive ones: 1 (k=1: kth best = 10) -> both alive rows exit at margin 0
    decided = TopKPolicy(0.5, k=1).decide(view([10.0, 2.0, 3.0], alive=[1, 2], residual_std=5.0))
    assert decided.tolist() == [True, True]


def test_topk_with_fusion_prunes_on_the_fused_ranking() -> None:
    """With first-stage scores and a weight, topk keeps what the *fused* ranking can still put in its top k."""
    scores = np.array([4.0, 3.0, 0.0, 2.0])  # model alone: k=2 -> 2nd best 3.0; 0.0 and 2.0 exit at margin 0
    first = np.array([0.0, 1.0, 10.0, 0.0])  # BM25 loves candidate 2
    plain = StageView(0, 2, 0.0, np.arange(4), scores, np.zeros(4, np.int64))
    assert TopKPolicy(0.5, k=2).decide(plain).tolist() == [False, False, True, True]
    fused = StageView(0, 2, 0.0, np.arange(4), scores, np.zeros(4, np.int64), first, 0.5, "minmax")
    # minmax: model [1, .75, 0, .5], first [0, .1, 1, 0] -> fused .5*(.) = [.5, .425, .5, .25]: 2nd best .5
    assert TopKPolicy(0.5, k=2).decide(fused).tolist() == [False, True, False, True]
    # the margin is converted to fused units: (1 - w) / range = 0.5 / 4 per model unit; residual 2 at
    # threshold Phi(1) -> margin 2 model units = 0.25 fused units: .425 + .25 and .25 + .25 >= .5 -> nobody exits
    wide = StageView(0, 2, 2.0, np.arange(4), scores, np.zeros(4, np.int64), first, 0.5, "minmax")
    assert not TopKPolicy(0.8413448, k=2).decide(wide).any()
    # weight 0 (or no first-stage scores) is the plain policy
    zero = StageView(0, 2, 0.0, np.arange(4), scores, np.zeros(4, np.int64), first, 0.0, "minmax")
    assert TopKPolicy(0.5, k=2).decide(zero).tolist() == [False, False, True, True]


def test_fixed_policy_exits_at_its_layer() -> None:
    policy = FixedPolicy(4, (2, 4, 6))
    assert not policy.decide(view([0.0, 1.0], exit_layer=2)).any()
    assert policy.decide(view([0.0, 1.0], exit_layer=4)).all()
    with pytest.raises(OptionError, match=r"exit_layer=3 is invalid: expected one of the model's exits \[2, 4, 6\]"):
        FixedPolicy(3, (2, 4, 6))


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), "0.5", True, None])
def test_threshold_outside_unit_interval_is_an_error(bad: object) -> None:
    with pytest.raises(OptionError, match=r"expected a number in \[0, 1\]"):
        check_threshold(bad)
    if bad is not None:
        with pytest.raises(OptionError):
            make_policy("candidate", bad, (2, 4), 0.9)


def test_make_policy() -> None:
    assert make_policy("candidate", None, (2, 4), 0.8).threshold == 0.8
    assert make_policy("query", 0.7, (2, 4), 0.8).threshold == 0.7
    assert make_policy("topk", 0.7, (2, 4), 0.8, top_k=3).k == 3
    assert make_policy("fixed", None, (2, 4), 0.8).exit_layer == 4
    assert make_policy("fixed", None, (2, 4), 0.8, exit_layer=2).exit_layer == 2
    with pytest.raises(OptionError, match="policy='greedy' is invalid: expected one of candidate, query, topk, fixed"):
        make_policy("greedy", 0.5, (2, 4), 0.8)
    with pytest.raises(OptionError, match="top_k"):
        make_policy("topk", 0.5, (2, 4), 0.8, top_k=0)


def test_the_policy_registry_is_the_one_source_of_policy_names() -> None:  # issue 16
    import argparse

    from matryoshka.plugin.manifest_schema import POLICY_NAMES
    from matryoshka.plugin.options import add_model_options
    from matryoshka.plugin.policies import POLICIES
    from matryoshka.plugin.tuning import DEFAULT_THRESHOLDS

    parser = argparse.ArgumentParser()
    add_model_options(parser)
    choices = next(a.choices for a in parser._actions if "--policy" in a.option_strings)
    assert POLICY_NAMES == tuple(POLICIES) == tuple(choices)
    assert set(DEFAULT_THRESHOLDS) == {name for name, cls in POLICIES.items() if cls.sweep} == {"candidate", "query",
                                                                                              "topk"}
    for name, cls in POLICIES.items():
        assert cls.name == name and cls.help and make_policy(name, 0.9, (2, 4), 0.9).name == name


def test_no_policy_sweeps_a_threshold_that_lets_everyone_leave_at_the_first_exit() -> None:
    """A grid point equal to the first fixed exit is degenerate (issue 18: candidate@0.5 was one)."""
    from matryoshka.plugin.policies import POLICIES, make_policy
    from matryoshka.plugin.tuning import replay

    rng = np.random.default_rng(0)
    scores = np.column_stack([rng.normal(0, 3, 200), rng.normal(0, 3, 200)])
    groups = np.repeat(np.arange(10), 20)
    for name, cls in POLICIES.items():
        for threshold in cls.sweep:
            _, stage = replay(scores, groups, make_policy(name, threshold, (1, 2), threshold), (1, 2), [1.0, 0.0])
            assert (stage == 1).any(), f"{name}@{threshold} stops every candidate at the first exit"
