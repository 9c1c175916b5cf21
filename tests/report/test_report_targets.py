"""Cost to first reach fractions of the baseline's best (ProgFed Fig. 3-4)."""

from __future__ import annotations

import pytest

from fedml_progfed.report import (
    DEFAULT_FRACTIONS,
    compare_runs,
    cost_to_target,
    fraction_label,
)

NAN = float("nan")


def _run(metrics: list[float], bytes_per_round: int, flops_per_round: int) -> list[dict]:
    rows = []
    for i, m in enumerate(metrics):
        r = i + 1
        rows.append(
            {
                "round": r, "stage": 1, "active_params": 1,
                "bytes_down": bytes_per_round // 2, "bytes_up": bytes_per_round // 2,
                "cum_bytes": bytes_per_round * r,
                "client_flops": flops_per_round, "cum_flops": flops_per_round * r,
                "train_loss": 0.0, "test_loss": NAN if m != m else 0.0,
                "test_metric": m, "wall_s": 0.0,
            }
        )
    return rows


# Best 0.80 (round 5). Targets: 0.784, 0.792, 0.7996, 0.80.
BASELINE = _run([0.3, 0.6, 0.785, 0.795, 0.8, 0.79], bytes_per_round=1000, flops_per_round=100)
# Cheaper per round, reaches 98 % in r2, 99 % in r4 (r3 untested), 99.95 % in r5,
# never the baseline's best.
CANDIDATE = _run([0.5, 0.785, NAN, 0.793, 0.7997, 0.7999], bytes_per_round=400, flops_per_round=80)


def test_cost_to_target_first_round_inclusive() -> None:
    hit = cost_to_target(BASELINE, 0.8)
    assert hit == {"round": 5, "metric": 0.8, "cum_bytes": 5000, "cum_flops": 500}
    assert cost_to_target(BASELINE, 0.6)["round"] == 2
    assert cost_to_target(CANDIDATE, 0.8) is None
    # Untested rounds are never counted as reaching a target.
    assert cost_to_target(CANDIDATE, 0.79)["round"] == 4


def test_compare_runs_with_never_reached_target() -> None:
    out = compare_runs(BASELINE, CANDIDATE)
    assert [e["fraction"] for e in out] == list(DEFAULT_FRACTIONS)
    assert [e["target"] for e in out] == pytest.approx([0.784, 0.792, 0.7996, 0.8])
    assert [e["baseline_round"] for e in out] == [3, 4, 5, 5]
    assert [e["candidate_round"] for e in out] == [2, 4, 5, None]
    assert [e["baseline_bytes"] for e in out] == [3000, 4000, 5000, 5000]
    assert [e["candidate_bytes"] for e in out] == [800, 1600, 2000, None]
    assert [e["candidate_flops"] for e in out] == [160, 320, 400, None]

    first = out[0]
    assert first["bytes_reduction"] == pytest.approx(1 - 800 / 3000)
    assert first["flops_reduction"] == pytest.approx(1 - 160 / 300)
    last = out[-1]
    assert last["bytes_reduction"] is None and last["flops_reduction"] is None
    assert last["baseline_bytes"] == 5000 and last["candidate_bytes"] is None


def test_baseline_against_itself_has_zero_reduction() -> None:
    for e in compare_runs(BASELINE, BASELINE):
        assert e["bytes_reduction"] == 0.0 and e["flops_reduction"] == 0.0


def test_baseline_without_tests_raises() -> None:
    with pytest.raises(ValueError, match="baseline"):
        compare_runs(_run([NAN, NAN], 1, 1), CANDIDATE)


def test_fraction_labels() -> None:
    assert [fraction_label(f) for f in DEFAULT_FRACTIONS] == ["98 %", "99 %", "99.95 %", "100 %"]
