"""`qirl eval seeds`: an arm pooled over its training seeds from a bench folder."""

from __future__ import annotations

import json

import pytest
from qirl.cli.main import app
from typer.testing import CliRunner

from qirl.errors import UserError
from qirl.eval.seeds import mean_interval, seed_summary


def _bench(tmp_path, changes):
    """A bench.json with a base and one model per change (edit task), as `qirl eval bench` writes it."""
    base = {"overall": 50.0, "pillars": {"Success": 60.0, "Preservation": 70.0, "Quality": None}}
    results = {"base": {"edit": base}}
    for i, c in enumerate(changes):
        results[f"s{i}"] = {"edit": {
            "overall": 50.0 + c, "pillars": {"Success": 60.0 + 2 * c, "Preservation": 70.0 - 1.0, "Quality": None},
            "vs": {"base": {"change": c, "change_ci": [c - 5, c + 5]}},
        }}
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "bench.json").write_text(json.dumps({"results": results}))
    return folder


def test_mean_interval_is_students_t_over_seeds():
    mean, (lo, hi) = mean_interval([1.0, 2.0, 3.0])  # s = 1, n = 3: half-width t(0.975, 2) / sqrt(3)
    assert mean == 2.0 and hi - mean == pytest.approx(4.302653 / 3**0.5, rel=1e-5) and mean - lo == hi - mean
    assert mean_interval([4.0]) == (4.0, None)


def test_seed_summary_pools_an_arms_paired_changes(tmp_path):
    rows = seed_summary(_bench(tmp_path, [1.0, 2.0, 3.0]), ["rl=s0,s1,s2", "one=s2"])["rows"]
    rl, one = rows
    assert (rl["arm"], rl["task"], rl["seeds"], rl["change"], rl["overall"]) == ("rl", "edit", 3, 2.0, 52.0)
    assert rl["per_seed_change"] == [1.0, 2.0, 3.0] and rl["change_ci"][0] < 0 < 2.0 < rl["change_ci"][1]
    assert rl["pillar_change"] == {"Success": 4.0, "Preservation": -1.0}  # N/A pillars left out
    assert one["change"] == 3.0 and one["change_ci"] is None


@pytest.mark.parametrize(
    "arms, match",
    [
        (["rl"], "NAME=LABEL"),
        (["rl="], "NAME=LABEL"),
        (["rl=s0", "rl=s1"], "twice"),
        (["rl=s0,s9"], "not a model"),
        (["rl=base,s0"], "reference"),
        ([], "at least one"),
    ],
)
def test_bad_arms_are_user_errors(tmp_path, arms, match):
    with pytest.raises(UserError, match=match):
        seed_summary(_bench(tmp_path, [1.0]), arms)


def test_cli_prints_the_pooled_rows_and_exits_2_on_a_non_bench(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["eval", "seeds", str(_bench(tmp_path, [1.0, 3.0])), "--arm", "rl=s0,s1", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)[0]["change"] == 2.0
    bad = runner.invoke(app, ["eval", "seeds", str(tmp_path), "--arm", "rl=s0"])
    assert bad.exit_code == 2 and "not a bench folder" in bad.output
