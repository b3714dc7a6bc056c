"""Budget rules, the Selection result type and InstructDiff's trim + lowest-ΔH rule (docs/methods.md §1), by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest

from instructdiff.models import ModelRef
from instructdiff.rows import Row
from instructdiff.scoring import ScoreTable
from instructdiff.selection import Budget, Selection, SelectionContext
from instructdiff_baselines.instructdiff_selector import InstructDiffSelector, instructdiff_select

# ------------------------------------------------------------------------------------------ the hand-made case
# 20 finite rows r00..r19. ΔNLL extremes: lowest r01 (-3.0), r07 (-2.5); highest r04 (4.0), r11 (3.0).
# Those four carry the globally lowest ΔH (-10..-7), so a selector that skips the trim would pick them first.
IDS = [f"r{k:02d}" for k in range(20)]
D_NLL = [0.5, -3.0, 0.2, 0.9, 4.0, 0.1, 0.3, -2.5, 0.7, 0.4,
         0.6, 3.0, 0.8, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 0.05]
D_H = [0.9, -9.0, 0.3, -0.5, -10.0, 0.1, 2.0, -8.0, -1.0, 0.5,
       0.05, -7.0, 1.5, 0.7, -0.2, 3.0, 0.4, 1.1, 0.6, 0.2]
TRIMMED_LOW = {"r01", "r07"}
TRIMMED_HIGH = {"r04", "r11"}
# The 16 kept rows by ascending ΔH, worked out by hand from D_H.
KEPT_BY_DH = ["r08", "r03", "r14", "r10", "r05", "r19", "r02", "r16",
              "r09", "r18", "r13", "r00", "r17", "r12", "r06", "r15"]


def select(ids=IDS, d_nll=D_NLL, d_h=D_H, tokens=None, nll_trim=0.1, budget=None, pool_tokens=None):
    tokens = tokens if tokens is not None else {i: 1 for i in ids}
    return instructdiff_select(list(ids), np.array(d_nll, dtype=float), np.array(d_h, dtype=float), tokens,
                               nll_trim, budget or Budget(fraction=1.0), pool_tokens)


def test_hand_case_is_consistent() -> None:
    assert len(IDS) == len(D_NLL) == len(D_H) == 20
    assert sorted(KEPT_BY_DH) == sorted(set(IDS) - TRIMMED_LOW - TRIMMED_HIGH)


def test_trim_drops_floor_gamma_n_from_each_end() -> None:
    chosen, dropped, stats = select()
    assert dropped == {**{i: "nll_trim_low" for i in TRIMMED_LOW}, **{i: "nll_trim_high" for i in TRIMMED_HIGH}}
    assert stats["n_trimmed_each_side"] == 2 and stats["n_after_trim"] == 16
    assert stats["n_scored"] == 20 and stats["n_non_finite"] == 0
    assert chosen == KEPT_BY_DH  # fraction 1.0 of 20 samples: every kept row, ascending ΔH


def test_lowest_delta_entropy_among_kept_rows() -> None:
    chosen, _, stats = select(budget=Budget(fraction=0.25))  # floor(0.25 · 20) = 5
    assert chosen == ["r08", "r03", "r14", "r10", "r05"]
    assert "r04" not in chosen  # globally lowest ΔH but the highest ΔNLL
    assert "r01" not in chosen  # second-lowest ΔH but the lowest ΔNLL
    assert stats["budget_limit"] == 5 and stats["budget_unit"] == "samples"
    assert stats["delta_entropy_selected_max"] == pytest.approx(0.1)


def test_trim_fraction_other_gamma() -> None:
    # γ = 0.15: floor(3.0) = 3 per side -> additionally r19 (0.05, third lowest) and r18 (1.5, third highest).
    chosen, dropped, stats = select(nll_trim=0.15)
    assert stats["n_trimmed_each_side"] == 3
    assert {i for i, r in dropped.items() if r == "nll_trim_low"} == TRIMMED_LOW | {"r19"}
    assert {i for i, r in dropped.items() if r == "nll_trim_high"} == TRIMMED_HIGH | {"r18"}
    assert chosen == [i for i in KEPT_BY_DH if i not in ("r19", "r18")]


def test_no_trim_when_gamma_zero() -> None:
    chosen, dropped, stats = select(nll_trim=0.0)
    assert dropped == {} and stats["n_trimmed_each_side"] == 0
    assert chosen[:4] == ["r04", "r01", "r07", "r11"] and len(chosen) == 20


def test_small_pools_and_trim_guard() -> None:
    # n = 2, γ = 0.49: floor(0.98) = 0 -> nothing trimmed.
    chosen, dropped, stats = select(ids=["a", "b"], d_nll=[1.0, -1.0], d_h=[0.2, 0.1], nll_trim=0.49)
    assert dropped == {} and chosen == ["b", "a"] and stats["n_trimmed_each_side"] == 0
    # n = 3, γ = 0.49: floor(1.47) = 1, 2·1 < 3 -> one per side, the median row survives.
    chosen, dropped, _ = select(ids=["a", "b", "c"], d_nll=[5.0, -5.0, 0.0], d_h=[0.0, 0.0, 9.0], nll_trim=0.49)
    assert dropped == {"b": "nll_trim_low", "a": "nll_trim_high"} and chosen == ["c"]
    # 2·floor(γn) >= n needs γ >= 0.5, which is refused (so "keep all" is the only possible outcome).
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError):
            select(nll_trim=bad)


def test_non_finite_dropped_counted_and_excluded_from_n() -> None:
    # 20 finite rows plus 10 non-finite: n for the trim is 20 (floor(0.1·20) = 2, not floor(0.1·30) = 3);
    # the sample budget counts all 30 rows passed: floor(0.2 · 30) = 6.
    bad_ids = [f"x{k}" for k in range(10)]
    bad_nll = [np.nan, np.inf, -np.inf, 0.0, 0.0, np.nan, 1.0, 0.5, np.inf, np.nan]
    bad_h = [0.0, 0.0, 0.0, np.nan, np.inf, np.nan, -np.inf, -np.inf, -1.0, -50.0]
    ids = bad_ids[:5] + IDS + bad_ids[5:]
    d_nll = bad_nll[:5] + D_NLL + bad_nll[5:]
    d_h = bad_h[:5] + D_H + bad_h[5:]
    chosen, dropped, stats = select(ids=ids, d_nll=d_nll, d_h=d_h, budget=Budget(fraction=0.2))
    assert {i: r for i, r in dropped.items() if r == "non_finite_score"} == {i: "non_finite_score" for i in bad_ids}
    assert stats["n_non_finite"] == 10 and stats["n_scored"] == 30
    assert stats["n_trimmed_each_side"] == 2 and stats["n_after_trim"] == 16
    assert {i for i, r in dropped.items() if r.startswith("nll_trim")} == TRIMMED_LOW | TRIMMED_HIGH
    assert stats["budget_limit"] == 6
    assert chosen == KEPT_BY_DH[:6]


def test_all_non_finite_selects_nothing() -> None:
    chosen, dropped, stats = select(ids=["a", "b"], d_nll=[np.nan, 1.0], d_h=[0.0, np.inf])
    assert chosen == [] and dropped == {"a": "non_finite_score", "b": "non_finite_score"}
    assert stats["n_after_trim"] == 0 and stats["delta_entropy_selected_max"] is None


# ------------------------------------------------------------------------------------------ budgets


def test_sample_budget_counts_rows_passed_before_trim() -> None:
    # floor(0.1 · 20) = 2 (not floor(0.1 · 16) = 1 after the trim); floor(0.19 · 20) = floor(3.8) = 3.
    assert select(budget=Budget(fraction=0.1))[0] == KEPT_BY_DH[:2]
    assert select(budget=Budget(fraction=0.19))[0] == KEPT_BY_DH[:3]
    assert select(budget=Budget(fraction=0.04))[0] == []  # floor(0.8) = 0


def tokens_case(third: int) -> dict[str, int]:
    # Ordered kept rows start r08, r03, r14, r10; the trimmed r04 holds 100 tokens. Σ = 200 -> limit 20.
    t = {i: 4 for i in IDS}
    t.update({"r08": 8, "r03": 7, "r14": third, "r04": 100})
    t["r15"] += 200 - sum(t.values())
    assert sum(t.values()) == 200
    return t


def test_token_budget_overshoots_by_one_sample() -> None:
    tokens = tokens_case(third=9)  # running sum 8, 15, 24 >= 20: stop after r14 (24 > 20)
    chosen, _, stats = select(tokens=tokens, budget=Budget(fraction=0.1, unit="tokens"))
    assert chosen == ["r08", "r03", "r14"]
    assert stats["budget_limit"] == 20 and stats["selected_tokens"] == 24 and stats["budget_unit"] == "tokens"


def test_token_budget_hits_exactly() -> None:
    tokens = tokens_case(third=5)  # running sum 8, 15, 20 >= 20: stop after r14, r10 is not added
    chosen, _, stats = select(tokens=tokens, budget=Budget(fraction=0.1, unit="tokens"))
    assert chosen == ["r08", "r03", "r14"] and stats["selected_tokens"] == 20


def test_token_budget_uses_pool_tokens_argument() -> None:
    tokens = tokens_case(third=5)  # explicit pool total 300 -> limit 30: 8, 15, 20, 24, 28, 32
    chosen, _, stats = select(tokens=tokens, budget=Budget(fraction=0.1, unit="tokens"), pool_tokens=300)
    assert stats["budget_limit"] == 30
    assert chosen == KEPT_BY_DH[:6]


def test_count_overrides_fraction() -> None:
    assert select(budget=Budget(fraction=0.9, count=3))[0] == KEPT_BY_DH[:3]
    assert select(budget=Budget(fraction=None, count=0))[0] == []
    assert select(budget=Budget(count=1000))[0] == KEPT_BY_DH  # more than available: all kept rows
    tokens = tokens_case(third=9)
    assert select(tokens=tokens, budget=Budget(fraction=0.9, count=15, unit="tokens"))[0] == ["r08", "r03"]
    assert Budget(fraction=0.5, count=7).limit(1000, 10**6) == 7


def test_budget_limit_rules() -> None:
    assert Budget(fraction=0.1).limit(25, 999) == 2  # floor, not round
    assert Budget(fraction=0.1, unit="tokens").limit(25, 999) == 99
    assert Budget(fraction=1.0).limit(7, 0) == 7
    assert Budget.from_cfg({"fraction": 0.3, "count": None, "unit": "tokens"}) == Budget(0.3, None, "tokens")
    b = Budget(fraction=0.2)
    assert Budget.from_cfg(b) is b


def test_budget_limit_exact_decimal_fractions() -> None:
    assert Budget(fraction=0.7).limit(90, 0) == 63
    assert Budget(fraction=0.29).limit(100, 0) == 29
    assert Budget(fraction=0.57).limit(100, 0) == 57


@pytest.mark.parametrize("kwargs", [
    {"unit": "words"}, {"fraction": 0.0}, {"fraction": 1.5}, {"fraction": -0.1}, {"fraction": None},
    {"fraction": float("nan")}, {"count": -1}, {"fraction": None, "count": -3},
])
def test_invalid_budget_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Budget(**kwargs)


def test_valid_budget_edges() -> None:
    Budget(fraction=1.0)
    Budget(fraction=None, count=0)
    Budget(fraction=5.0, count=3)  # count overrides, fraction unused


# ------------------------------------------------------------------------------------------ tie-breaking


def test_delta_entropy_ties_break_by_id_whatever_the_input_order() -> None:
    ids = ["d", "b", "e", "a", "c", "f"]
    d_nll = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    d_h = [1.0, 1.0, 0.0, 1.0, 1.0, -1.0]
    expected = ["f", "e", "a", "b", "c", "d"]
    rng = random.Random(0)
    for _ in range(6):
        perm = list(range(len(ids)))
        rng.shuffle(perm)
        chosen, _, _ = select(ids=[ids[k] for k in perm], d_nll=[d_nll[k] for k in perm],
                              d_h=[d_h[k] for k in perm], nll_trim=0.0)
        assert chosen == expected


def test_delta_nll_ties_break_by_id_in_the_trim() -> None:
    ids = [f"t{k}" for k in range(10)]
    rng = random.Random(1)
    for _ in range(4):
        order = ids[:]
        rng.shuffle(order)
        _, dropped, _ = select(ids=order, d_nll=[0.0] * 10, d_h=[0.0] * 10, nll_trim=0.1)
        assert dropped == {"t0": "nll_trim_low", "t9": "nll_trim_high"}


# ------------------------------------------------------------------------------------------ Selection.build


def test_selection_build_statuses_and_counts() -> None:
    pool = ["a", "b", "c", "d", "e", "f"]
    sel = Selection.build(pool, ["c", "a"], {"b": "nll_trim_low", "e": "non_finite_score"},
                          scores={"a": {"x": 1.0}}, stats={"note": 1})
    assert sel.selected == ["c", "a"]  # rank order kept
    assert sel.status == {"a": "selected", "b": "dropped:nll_trim_low", "c": "selected", "d": "not_selected",
                          "e": "dropped:non_finite_score", "f": "not_selected"}
    assert sel.stats["counts"] == {"selected": 2, "not_selected": 2, "dropped": 2}
    assert sel.stats["dropped_reasons"] == {"nll_trim_low": 1, "non_finite_score": 1}
    assert sel.stats["note"] == 1 and sel.scores == {"a": {"x": 1.0}}
    assert sum(sel.stats["counts"].values()) == len(pool)


def test_selection_build_from_instructdiff_output() -> None:
    chosen, dropped, stats = select(budget=Budget(fraction=0.25))
    sel = Selection.build(IDS, chosen, dropped, stats=stats)
    assert set(sel.status) == set(IDS)
    assert sel.stats["counts"] == {"selected": 5, "not_selected": 11, "dropped": 4}
    assert sel.stats["dropped_reasons"] == {"nll_trim_low": 2, "nll_trim_high": 2}


@pytest.mark.parametrize("selected,dropped", [
    (["a", "a"], {}),  # duplicate
    (["a", "b"], {"b": "nll_trim_low"}),  # both selected and dropped
    (["a", "zz"], {}),  # not in the pool
])
def test_selection_build_rejects(selected: list[str], dropped: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Selection.build(["a", "b", "c"], selected, dropped)


def test_selection_build_rejects_dropped_ids_outside_the_pool_and_duplicate_pool_ids() -> None:
    with pytest.raises(ValueError, match="not in the pool"):
        Selection.build(["a", "b"], ["a"], {"zz": "nll_trim_low"})
    with pytest.raises(ValueError, match="duplicate ids"):
        Selection.build(["a", "a"], ["a"], {})


# ------------------------------------------------------------------------------------------ warmup ids


def test_warmup_ids_size_determinism_order() -> None:
    ids = [f"p{k:03d}" for k in range(100)]
    sel = InstructDiffSelector(warmup_ratio=0.1)
    w = sel.warmup_ids(ids, seed=42)
    assert len(w) == 10 and len(set(w)) == 10 and set(w) <= set(ids)
    assert w == sel.warmup_ids(ids, seed=42) == InstructDiffSelector(warmup_ratio=0.1).warmup_ids(ids, 42)
    assert w == sorted(w, key=ids.index)  # pool order
    assert set(w) == set(random.Random(42).sample(ids, 10))  # the reference code's random.seed(42); sample()
    others = {tuple(sel.warmup_ids(ids, seed=s)) for s in range(5)}
    assert len(others) == 5


@pytest.mark.parametrize("ratio,n,size", [(0.1, 37, 4), (0.1, 3, 1), (0.1, 5, 1), (0.25, 10, 3), (1.0, 6, 6),
                                          (0.05, 1000, 50)])
def test_warmup_ids_size_is_rounded_at_least_one(ratio: float, n: int, size: int) -> None:
    ids = [f"q{k}" for k in range(n)]
    assert len(InstructDiffSelector(warmup_ratio=ratio).warmup_ids(ids, seed=0)) == size


def test_warmup_seed_overrides_run_seed() -> None:
    ids = [f"p{k:03d}" for k in range(50)]
    fixed = InstructDiffSelector(warmup_ratio=0.2, warmup_seed=7)
    assert fixed.warmup_ids(ids, seed=1) == fixed.warmup_ids(ids, seed=2) == \
        InstructDiffSelector(warmup_ratio=0.2).warmup_ids(ids, seed=7)


@pytest.mark.parametrize("kwargs", [{"warmup_ratio": 0.0}, {"warmup_ratio": 1.5}, {"rounds": 0}])
def test_selector_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        InstructDiffSelector(**kwargs)


# ------------------------------------------------------------------------------------------ select() wiring


def fake_context(pool: list[Row], base: ScoreTable, cal: ScoreTable, seed: int = 3):
    calls: dict[str, list] = {"calibrate": [], "score": []}
    base_ref = ModelRef("base", "/nonexistent/base", "fp-base")
    cal_ref = ModelRef("cal", "/nonexistent/cal", "fp-cal")

    def calibrate(rows, desc):
        calls["calibrate"].append(([r.id for r in rows], desc))
        return cal_ref

    def score(ref, desc):
        calls["score"].append((ref.name, desc))
        return {"base": base, "cal": cal}[ref.name]

    def train(rows, desc):
        raise AssertionError("one round must not train")

    ctx = SelectionContext(pool=pool, response_tokens={r.id: 1 for r in pool}, rng=np.random.default_rng(seed),
                           seed=seed, base=base_ref, score=score, calibrate=calibrate, train=train,
                           log=lambda _msg: None)
    return ctx, calls


def test_select_uses_base_minus_calibrated_deltas() -> None:
    pool = [Row(i, f"instr {i}", "", f"resp {i}") for i in IDS]
    rng = np.random.default_rng(0)
    base_nll, base_h = rng.normal(2.0, 0.3, 20), rng.normal(3.0, 0.3, 20)
    # calibrated = base − Δ, so Δ = base − calibrated reproduces the hand case exactly.
    cal_nll, cal_h = base_nll - np.array(D_NLL), base_h - np.array(D_H)
    n_tok = np.ones(20)
    rev = IDS[::-1]  # tables in another order than the pool: alignment must be by id
    base = ScoreTable(rev, {"nll": base_nll[::-1], "entropy": base_h[::-1], "n_tokens": n_tok})
    cal = ScoreTable(rev, {"nll": cal_nll[::-1], "entropy": cal_h[::-1], "n_tokens": n_tok})
    selector = InstructDiffSelector(budget={"fraction": 0.25, "unit": "samples"}, warmup_ratio=0.1)
    ctx, calls = fake_context(pool, base, cal)
    sel = selector.select(ctx)
    assert sel.selected == ["r08", "r03", "r14", "r10", "r05"]
    assert calls["calibrate"] == [(selector.warmup_ids(IDS, 3), "warmup")]
    assert [c[0] for c in calls["score"]] == ["base", "cal"]
    assert sel.scores["r04"]["delta_nll"] == pytest.approx(4.0)
    assert sel.scores["r04"]["delta_entropy"] == pytest.approx(-10.0)
    assert sel.stats["counts"] == {"selected": 5, "not_selected": 11, "dropped": 4}
    assert sel.stats["warmup_ids"] == selector.warmup_ids(IDS, 3)


def test_select_exclude_warmup() -> None:
    pool = [Row(i, f"instr {i}", "", f"resp {i}") for i in IDS]
    zeros = np.zeros(20)
    base = ScoreTable(IDS, {"nll": np.array(D_NLL), "entropy": np.array(D_H), "n_tokens": zeros + 1})
    cal = ScoreTable(IDS, {"nll": zeros, "entropy": zeros, "n_tokens": zeros + 1})
    selector = InstructDiffSelector(budget={"fraction": 1.0}, warmup_ratio=0.1, nll_trim=0.0, exclude_warmup=True)
    ctx, _ = fake_context(pool, base, cal)
    sel = selector.select(ctx)
    warm = selector.warmup_ids(IDS, 3)
    assert len(warm) == 2
    for i in warm:
        assert sel.status[i] == "dropped:warmup_excluded"
    assert sel.selected == [i for i in sorted(IDS, key=lambda i: (D_H[IDS.index(i)], i)) if i not in warm]
