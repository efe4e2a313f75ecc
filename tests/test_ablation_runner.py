"""The ablation study's runner (records, skipping, exact resume), its report and its command."""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest

from sepvit.ablation import report as report_module
from sepvit.ablation.report import CLAIMS, write_report
from sepvit.ablation.runner import read_results, run_study
from sepvit.ablation.study import PROTOCOLS, VARIANTS
from sepvit.cli import main
from sepvit.engine import reporting
from sepvit.errors import ConfigError, DataError

SMOKE = PROTOCOLS["smoke"]
TWO_EPOCHS = dataclasses.replace(SMOKE, epochs=2)
FIELDS = {"task", "variant", "seed", "top1", "params", "gmacs", "images_per_s", "epochs", "seconds"}


def test_interrupted_run_resumes_exactly_and_recorded_runs_are_not_repeated(
    tmp_path, monkeypatch, capsys, one_thread
):
    plain = run_study(
        TWO_EPOCHS, tmp_path / "plain.json", tmp_path / "runs-plain", "cpu", ("pair-sum",), ("sepvit",)
    )
    assert (plain.ran, plain.skipped, plain.exit_code) == (1, 0, 0)
    (expected,) = read_results(tmp_path / "plain.json")
    assert set(expected) >= FIELDS and expected["epochs"] == 2 and expected["protocol"] == "smoke"
    assert 0 <= expected["top1"] <= 100
    for key in ("erf_trained", "erf_init", "erf_stage1_trained", "erf_stage1_init"):
        assert 0 < expected[key] < 1, key
    assert expected["params"] > 0 and expected["gmacs"] > 0 and expected["images_per_s"] > 0

    # SIGINT in the second epoch: the engine saves mid-epoch, the study stops with 128 + 2, no record.
    updates = []
    original = reporting.Progress.update

    def interrupt_once(self, *args):
        updates.append(1)
        if len(updates) == 8:  # epoch 2, step 2 of 6
            signal.raise_signal(signal.SIGINT)
        original(self, *args)

    monkeypatch.setattr(reporting.Progress, "update", interrupt_once)
    results, runs = tmp_path / "results.json", tmp_path / "runs"
    stopped = run_study(TWO_EPOCHS, results, runs, "cpu", ("pair-sum",), ("sepvit",))
    assert stopped.exit_code == 128 + signal.SIGINT and stopped.ran == 0 and not results.exists()
    monkeypatch.setattr(reporting.Progress, "update", original)
    capsys.readouterr()
    resumed = run_study(TWO_EPOCHS, results, runs, "cpu", ("pair-sum",), ("sepvit",))
    assert resumed.ran == 1 and "resumed" in capsys.readouterr().out
    (record,) = read_results(results)
    for key in ("top1", "val_top1", "erf_trained", "erf_stage1_trained", "params", "gmacs", "epochs"):
        assert record[key] == expected[key], key

    def must_not_train(*args):
        raise AssertionError("a recorded run was trained again")

    again = run_study(TWO_EPOCHS, results, runs, "cpu", ("pair-sum",), ("sepvit",), train=must_not_train)
    assert (again.ran, again.skipped, again.exit_code) == (0, 1, 0)


def fake_record(task: str, variant: str, seed: int, top1: float, **extra) -> dict:
    values = dict(params=1_000_000, gmacs=0.2, images_per_s=50.0, epochs=3, seconds=9.0)
    values.update(erf_trained=0.5, erf_init=0.4, erf_stage1_trained=0.1, erf_stage1_init=0.1)
    values.update(extra)
    return dict(protocol="reduced", task=task, variant=variant, seed=seed, top1=top1, **values)


def test_study_records_each_run_as_it_ends_and_stops_at_an_interruption(tmp_path):
    calls = []

    def train(protocol, task, variant, seed, runs_dir, device):
        calls.append((task, variant, seed))
        if len(calls) == 3:
            return 130, None
        return 0, fake_record(task, variant, seed, 50.0)

    results = tmp_path / "docs" / "results.json"
    outcome = run_study(PROTOCOLS["reduced"], results, tmp_path, seeds=(0,), train=train)
    assert outcome.exit_code == 130 and outcome.ran == 2
    assert [(r["task"], r["variant"]) for r in read_results(results)] == [
        ("pair-sum", "dssa"),
        ("pair-sum", "sepvit"),
    ]
    plan = PROTOCOLS["reduced"].plan()
    assert len(plan) == 3 * (len(VARIANTS) + 3)  # every variant on pair-sum, three on the control task
    assert len(set(plan)) == len(plan)
    with pytest.raises(ConfigError, match="unknown variant"):
        PROTOCOLS["reduced"].plan(variants=("sepvit", "nope"))


def test_a_damaged_results_file_is_refused_and_kept(tmp_path):
    results = tmp_path / "results.json"
    results.write_text('{"records": [{"task": "pair-sum"}]}')
    with pytest.raises(DataError, match="not a results file"):
        run_study(SMOKE, results, tmp_path, train=lambda *args: pytest.fail("trained"))
    assert results.read_text() == '{"records": [{"task": "pair-sum"}]}'
    assert (
        main(["ablate", "--results", str(results), "--report-only", "--claims", str(tmp_path / "c.md")]) == 2
    )


def fake_results() -> list[dict]:
    """Seeds chosen so that each verdict is known in advance (pooled std 1 where spreads are 1)."""
    records = []
    for seed, offset in enumerate((-1.0, 0.0, 1.0)):
        records += [
            fake_record("pair-sum", "sepvit", seed, 90 + offset, erf_trained=0.9 + offset / 100),
            fake_record("pair-sum", "dssa-gsa", seed, 80 + offset),  # 10 below: reproduces
            fake_record("pair-sum", "avgpool", seed, 95 + offset),  # 5 above: reversed
            fake_record("pair-sum", "dwconv", seed, 89 + offset),  # 1 below, std 1: not resolved
            fake_record("pair-sum", "local", seed, 30 + offset, erf_trained=0.2),
            fake_record("single", "sepvit", seed, 97 + offset),
            fake_record("single", "local", seed, 96.5 + offset),  # equal within 2 std
            fake_record("single", "swin", seed, 80 + offset),  # not equal
        ]
    records.append(fake_record("pair-sum", "plan-dddd", 0, 70.0))  # one seed: no verdict
    records.append({**fake_record("pair-sum", "sepvit", 0, 0.0), "protocol": "smoke"})  # other protocol
    return records


def verdicts(markdown: str) -> dict[tuple[str, str, str, str], str]:
    found = {}
    for claim in CLAIMS:
        line = next(
            line
            for line in markdown.splitlines()
            if f"(`{claim.better}` vs `{claim.worse}`, {claim.task})" in line
            and report_module.MEASURES[claim.measure] in line
        )
        found[(claim.better, claim.worse, claim.task, claim.measure)] = line.rsplit("|", 2)[-2].strip()
    return found


def test_report_states_each_claim_with_its_verdict(tmp_path):
    claims, plots = tmp_path / "paper_claims.md", tmp_path / "ablations"
    written = write_report(fake_results(), "reduced", claims, plots, plots / "results.json")
    assert written == [claims, plots / "top1.png", plots / "erf.png"]
    assert all(path.stat().st_size > 1000 for path in written[1:])
    markdown = claims.read_text()
    found = verdicts(markdown)
    assert found[("sepvit", "dssa-gsa", "pair-sum", "top1")] == "reproduces"
    assert found[("sepvit", "avgpool", "pair-sum", "top1")] == "reversed"
    assert found[("sepvit", "dwconv", "pair-sum", "top1")] == "difference < 2 std: not resolved"
    assert found[("sepvit", "plan-dddd", "pair-sum", "top1")] == "fewer than 2 seeds: no verdict"
    assert found[("sepvit", "local", "pair-sum", "top1")] == "reproduces"
    assert found[("sepvit", "local", "pair-sum", "erf_trained")] == "reproduces"
    assert found[("sepvit", "local", "single", "top1")] == "reproduces (difference < 2 std)"
    assert found[("sepvit", "swin", "single", "top1")] == "does not reproduce (difference ≥ 2 std)"
    assert found[("dssa", "swin", "pair-sum", "top1")] == "not run"
    assert "| `sepvit` | pair-sum | 90.00 ± 1.00 (n=3) |" in markdown  # the smoke record is left out
    assert "82.7 vs 82.5" in markdown and "![top1](ablations/top1.png)" in markdown


def test_ablate_command_writes_the_report_from_a_results_file(tmp_path, capsys):
    results = tmp_path / "docs" / "ablations" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"records": fake_results()}))
    claims = tmp_path / "docs" / "paper_claims.md"
    args = ["ablate", "--report-only", "--results", str(results), "--claims", str(claims)]
    assert main(args) == 0
    assert "reproduces" in claims.read_text() and (results.parent / "erf.png").exists()
    assert main([*args, "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("sepvit ablate: error: --threads")


def test_runs_folder_that_cannot_be_written_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    args = ["ablate", "--protocol", "smoke", "--runs", str(blocker), "--results", str(tmp_path / "r.json")]
    assert main([*args, "--claims", str(tmp_path / "claims.md")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot write" in error[0] and "runs/data" in error[0]
    assert not (tmp_path / "r.json").exists()


def test_shards_side_by_side_record_every_run_once(tmp_path):
    """Two processes' worth of shards, run concurrently, merge every record into one file."""
    import threading
    import time

    def train(protocol, task, variant, seed, runs_dir, device):
        time.sleep(0.01)  # let the shards' writes interleave
        return 0, fake_record(task, variant, seed, 50.0 + seed)

    results = tmp_path / "results.json"
    shards = [
        threading.Thread(
            target=run_study,
            args=(PROTOCOLS["reduced"], results, tmp_path),
            kwargs={"seeds": (0, 1), "train": train, "shard": (k, 3)},
        )
        for k in range(3)
    ]
    for shard in shards:
        shard.start()
    for shard in shards:
        shard.join()
    plan = PROTOCOLS["reduced"].plan(seeds=(0, 1))
    recorded = [(r["task"], r["variant"], r["seed"]) for r in read_results(results)]
    assert sorted(recorded) == sorted(plan)

    def must_not_train(*args):
        raise AssertionError("a recorded run was trained again")

    again = run_study(
        PROTOCOLS["reduced"], results, tmp_path, seeds=(0, 1), train=must_not_train, shard=(1, 3)
    )
    assert again.ran == 0 and again.skipped == len(plan[1::3])


def test_jobs_run_the_study_in_worker_processes_and_report_once(tmp_path, capsys):
    results, claims = tmp_path / "results.json", tmp_path / "claims.md"
    args = ["ablate", "--protocol", "smoke", "--tasks", "single", "--variants", "sepvit", "local"]
    args += ["--runs", str(tmp_path / "runs"), "--results", str(results), "--claims", str(claims)]
    assert main([*args, "--jobs", "2"]) == 0
    recorded = {(r["variant"], r["seed"]) for r in read_results(results)}
    assert recorded == {("sepvit", 0), ("local", 0)}
    assert "`sepvit` vs `local`, single" in claims.read_text()
    capsys.readouterr()
    assert main([*args, "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
