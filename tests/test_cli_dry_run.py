"""``run --dry-run`` builds what a real run builds before its first round, and ``compare`` checks every
method that way before it trains the first: what a run refuses at start-up, they refuse too."""

from __future__ import annotations

import pytest

from fedml_progfed.cli import main

#: Configs that load (their keys are valid) and that only building the run refuses.
REFUSED_AT_SET_UP = {
    "an uplink codec that does not exist": (
        ["progfed_args.progfed_compression_up=lq3"],
        "error: progfed_args.progfed_compression_up: unknown compression part 'lq3' in 'lq3'",
    ),
    "error feedback on the broadcast": (
        ["progfed_args.progfed_compression_down=lq8+ef"],
        "error: progfed_args.progfed_compression_down: 'lq8+ef': a broadcast's change is computed against what the "
        "client reconstructed",
    ),
    "memory budgets that do not parse": (["memory_args.memory_budgets=bogus:1"], "error: memory_args.memory_budgets: "),
    "a ProFL step cap that leaves no round for the last step": (
        ["progfed_args.progfed_strategy=profl", "profl_args.profl_min_rounds_per_step=1",
         "profl_args.profl_max_rounds_per_step=1"],
        "error: profl_args.profl_max_rounds_per_step: 1 rounds for each of the 9 steps",
    ),
}


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("case", sorted(REFUSED_AT_SET_UP))
def test_the_dry_run_refuses_what_the_real_run_refuses(small_config, tmp_path, capsys, case):
    overrides, line = REFUSED_AT_SET_UP[case]
    real = main(["run", "--cf", str(small_config), "--out", str(tmp_path / "real"), "--quiet", "--set", *overrides])
    real_errors = _errors(capsys)
    assert real == 2 and len(real_errors) == 1 and real_errors[0].startswith(line), real_errors
    dry = main(["run", "--cf", str(small_config), "--dry-run", "--out", str(tmp_path / "dry"), "--set", *overrides])
    assert dry == 2 and _errors(capsys) == real_errors  # the very same line
    assert not (tmp_path / "dry").exists()


def test_a_valid_config_still_dry_runs_through_the_real_set_up(small_config, tmp_path, capsys, monkeypatch):
    from fedml_progfed.runners import federation

    built = []
    real_build = federation.build_federation
    monkeypatch.setattr(federation, "build_federation", lambda *a, **k: built.append(a) or real_build(*a, **k))
    code = main(["run", "--cf", str(small_config), "--dry-run", "--out", str(tmp_path / "dry"),
                 "--set", "progfed_args.progfed_compression_up=lq8+sp25"])
    out = capsys.readouterr().out.strip()
    assert code == 0, out
    assert out.startswith(f"dry run of {small_config}: model convnet (93,322 parameters, 4 stages; input 1x28x28, "
                          f"10 classes), strategy progfed with fedavg; 10 clients, 5 per round, 8 rounds")
    assert out.endswith("its files are all present. Nothing was trained.")
    assert len(built) == 1  # the function every run builds itself with
    assert not (tmp_path / "dry").exists()


def test_compare_checks_every_method_before_it_trains_the_first(small_config, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--cf", str(small_config), "--out", str(out), "--quiet", "--methods", "e2e,progfed,profl",
                 "--set", "profl_args.profl_min_rounds_per_step=1", "profl_args.profl_max_rounds_per_step=1"])
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: profl_args.profl_max_rounds_per_step: 1 rounds for each of the 9 steps")
    assert not out.exists()  # nothing trained, nothing written


def test_compare_checks_every_variant_of_every_method(small_config, tmp_path, capsys):
    code = main(["compare", "--cf", str(small_config), "--out", str(tmp_path / "cmp"), "--quiet",
                 "--variants", "float,lq3"])
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(
        "error: progfed_args.progfed_compression_up: unknown compression part 'lq3'"), errors
    assert not (tmp_path / "cmp").exists()
