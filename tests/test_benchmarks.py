"""The benchmark scripts that chapter 8's speed-ups rest on run, and their report renders them."""

import json

import pytest

from test_omniglot import full_data_or_skip


def test_meta_test_speed_scores_alike_and_reports_ratios_to_the_whole_chunk(tmp_path, capsys):
    full_data_or_skip()
    from benchmarks import meta_test_speed, report

    out = tmp_path / "speed.json"
    args = ["--runs", "maml-5w1s", "--groups", "50,10", "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert meta_test_speed.main([*args, "--note", "a test"]) == 0
    result = json.loads(out.read_text())
    paths = result["runs"]["maml-5w1s"]["paths"]
    assert set(paths) == {"50", "10"} and result["note"] == "a test" and result["tasks"] == 50
    assert paths["50"]["ratio_to_whole_chunk"] == 1.0
    assert paths["10"]["ratio_to_whole_chunk"] == pytest.approx(
        paths["10"]["median_s"] / paths["50"]["median_s"]
    )
    assert paths["10"]["same_scores"] and paths["50"]["same_scores"]
    table = report.meta_test_table(result)
    assert table.count("| maml-5w1s |") == 2 and "same scores" in table
    assert "10 tasks per call" in capsys.readouterr().out
    with pytest.raises(ValueError, match="must include 50"):
        meta_test_speed.main(["--runs", "maml-5w1s", "--groups", "10"])
