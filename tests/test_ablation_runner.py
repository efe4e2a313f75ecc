"""The ablation study's runner (pilot, records, reuse, exact resume), its report's rules and its command."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import pytest
from scipy import stats

from sepvit.ablation import report as report_module
from sepvit.ablation.report import CLAIMS, verdict, write_report
from sepvit.ablation.runner import chosen_lrs, read_results, run_study
from sepvit.ablation.study import FAMILIES, PROTOCOLS, VARIANTS
from sepvit.cli import main
from sepvit.engine import reporting
from sepvit.errors import ConfigError, DataError

SMOKE = PROTOCOLS["smoke"]
TWO_EPOCHS = dataclasses.replace(SMOKE, epochs=2, pilot_epochs=2)
REDUCED = PROTOCOLS["reduced"]
REPO = Path(__file__).resolve().parents[1]


def test_interrupted_run_resumes_exactly_and_recorded_runs_are_not_repeated(
    tmp_path, monkeypatch, capsys, one_thread
):
    plan = TWO_EPOCHS.pilot_plan(("sepvit",))
    assert plan == [("cue", "sepvit", 100, lr) for lr in SMOKE.lrs]
    plain = run_study(
        TWO_EPOCHS, "pilot", tmp_path / "plain.json", tmp_path / "runs-plain", "cpu", None, ("sepvit",)
    )
    assert (plain.ran, plain.skipped, plain.exit_code) == (2, 0, 0)
    expected = read_results(tmp_path / "plain.json").records[0]
    assert expected["epochs"] == 2 and len(expected["val_curve"]) == 2 and len(expected["train_loss"]) == 2
    assert expected["val_top1"] == expected["val_curve"][-1] and 0 <= expected["top1"] <= 100
    for key in ("erf_stage1_trained", "erf_stage1_init", "erf_stage2_trained", "erf_stage2_init"):
        assert 0 < expected[key] < 1, key
    assert expected["params"] > 0 and expected["gmacs"] > 0

    # SIGINT in the second epoch of the first run: the engine saves mid-epoch, the study stops with
    # 128 + 2 and records nothing; the same call resumes it exactly.
    updates = []
    original = reporting.Progress.update

    def interrupt_once(self, *args):
        updates.append(1)
        if len(updates) == 6:  # epoch 2, step 2 of 4
            signal.raise_signal(signal.SIGINT)
        original(self, *args)

    monkeypatch.setattr(reporting.Progress, "update", interrupt_once)
    results, runs = tmp_path / "results.json", tmp_path / "runs"
    stopped = run_study(TWO_EPOCHS, "pilot", results, runs, "cpu", None, ("sepvit",))
    assert stopped.exit_code == 128 + signal.SIGINT and stopped.ran == 0 and not results.exists()
    monkeypatch.setattr(reporting.Progress, "update", original)
    capsys.readouterr()
    resumed = run_study(TWO_EPOCHS, "pilot", results, runs, "cpu", None, ("sepvit",))
    assert resumed.ran == 2 and "resumed" in capsys.readouterr().out
    for record, reference in zip(
        read_results(results).records, read_results(tmp_path / "plain.json").records
    ):
        for key in ("lr", "top1", "val_curve", "train_loss", "erf_stage1_trained", "erf_stage2_init"):
            assert record[key] == reference[key], key

    def must_not_train(*args):
        raise AssertionError("a recorded run was trained again")

    again = run_study(TWO_EPOCHS, "pilot", results, runs, "cpu", None, ("sepvit",), train=must_not_train)
    assert (again.ran, again.skipped, again.exit_code) == (0, 2, 0)
    assert f"pilot: reusing 2 of 2 runs recorded in {results}" in capsys.readouterr().out


def fake_record(
    task: str, variant: str, seed: int, top1: float, phase: str = "main", lr: float = 1e-3, **extra
):
    values = dict(
        params=1_000_000, gmacs=0.2, epochs=3, seconds=9.0, val_top1=top1, val_curve=[top1 / 2, top1]
    )
    values.update(erf_stage1_trained=0.1, erf_stage1_init=0.1, erf_stage2_trained=0.3, erf_stage2_init=0.2)
    values.update(extra)
    record = dict(protocol="reduced", fingerprint=REDUCED.fingerprint, data_seed=0, phase=phase, task=task)
    record.update(variant=variant, seed=seed, lr=lr)
    return {**record, "top1": top1, **values}


def pilot_records(best: dict[str, float] | None = None) -> list[dict]:
    """A pilot whose best rate is ``best[family]`` (1e-3 where not given)."""
    records = []
    for family in FAMILIES:
        leader = next(v.name for v in VARIANTS.values() if v.family == family)
        for lr in REDUCED.lrs:
            score = 80.0 if lr == (best or {}).get(family, 1e-3) else 60.0
            records.append(fake_record("cue", leader, REDUCED.pilot_seed, score, phase="pilot", lr=lr))
    return records


def test_main_runs_wait_for_the_pilot_and_use_each_familys_best_rate(tmp_path):
    results = tmp_path / "results.json"
    with pytest.raises(ConfigError, match="pilot of the sepvit family has not run"):
        run_study(REDUCED, "main", results, tmp_path, train=lambda *args: pytest.fail("trained"))
    pilot = pilot_records({"sepvit": 2e-3, "swin-cpvt": 5e-4})
    assert chosen_lrs(pilot, REDUCED) == {"sepvit": 2e-3, "local": 1e-3, "swin-cpvt": 5e-4, "swin": 1e-3}
    tie = [{**r, "val_top1": 50.0} if r["variant"] == "local" else r for r in pilot]
    assert chosen_lrs(tie, REDUCED)["local"] == min(REDUCED.lrs)  # a tie goes to the smaller rate
    results.write_text(json.dumps({"records": pilot}))
    plan = REDUCED.main_plan(chosen_lrs(pilot, REDUCED))
    comparisons = [v for v in VARIANTS if not VARIANTS[v].reference]
    expected = len(comparisons) * len(REDUCED.seeds) + len(REDUCED.reference_seeds)
    expected += len(VARIANTS) * len(REDUCED.control_seeds)
    assert len(plan) == len(set(plan)) == expected and len(REDUCED.seeds) >= 5
    assert {(v, lr) for _, v, _, lr in plan} == {
        (v, {"sepvit": 2e-3, "swin-cpvt": 5e-4}.get(VARIANTS[v].family, 1e-3)) for v in VARIANTS
    }
    assert REDUCED.pilot_seed not in REDUCED.seeds  # the rate is not chosen on a seed that is judged
    calls = []

    def train(protocol, phase, run, runs_dir, device):
        calls.append(run)
        if len(calls) == 3:
            return 130, None
        task, variant, seed, lr = run
        return 0, fake_record(task, variant, seed, 50.0, lr=lr)

    outcome = run_study(REDUCED, "main", results, tmp_path, seeds=(0,), train=train)
    assert outcome.exit_code == 130 and outcome.ran == 2
    recorded = [r for r in read_results(results).records if r["phase"] == "main"]
    assert {(r["variant"], r["lr"]) for r in recorded} == {(run[1], run[3]) for run in calls[:2]}
    with pytest.raises(ConfigError, match="unknown variant"):
        REDUCED.main_plan(chosen_lrs(pilot, REDUCED), variants=("sepvit", "nope"))


def test_a_damaged_results_file_is_refused_and_kept(tmp_path):
    results = tmp_path / "results.json"
    results.write_text('{"records": [{"task": "cue"}]}')
    with pytest.raises(DataError, match="not a results file"):
        run_study(SMOKE, "pilot", results, tmp_path, train=lambda *args: pytest.fail("trained"))
    assert results.read_text() == '{"records": [{"task": "cue"}]}'
    args = ["ablate", "--results", str(results), "--report-only", "--claims", str(tmp_path / "c.md")]
    assert main(args) == 2
    assert results.read_text() == '{"records": [{"task": "cue"}]}'


# ---------------------------------------------------------------------------------- the verdict rules


def main_records(differences: dict[str, list[float]], control: dict[str, float] | None = None) -> list[dict]:
    """sepvit at 80 + noise on every seed, each other variant at sepvit's score minus its difference;
    every variant passes the control gate unless ``control`` says otherwise."""
    noise = [0.0, 1.0, -1.0, 2.0, -2.0]
    records = [fake_record("cue", "sepvit", seed, 80 + n) for seed, n in enumerate(noise)]
    for variant, gaps in differences.items():
        records += [
            fake_record("cue", variant, seed, 80 + n - gap) for seed, (n, gap) in enumerate(zip(noise, gaps))
        ]
    for variant in VARIANTS:
        records.append(fake_record("single", variant, 0, (control or {}).get(variant, 97.0)))
    return records


def claim(better: str, worse: str, measure: str = "top1"):
    return next(c for c in CLAIMS if (c.better, c.worse, c.measure) == (better, worse, measure))


def test_each_verdict_follows_the_stated_rule():
    records = main_records(
        {
            "avgpool": [5, 6, 4, 5, 5],  # clearly worse than sepvit: reproduces
            "dwconv": [-5, -6, -4, -5, -5],  # clearly better: contradicts
            "dssa": [0.5, -0.5, 0.2, -0.2, 0.0],  # tiny differences, tight: equivalent
            "local": [8, -6, 5, -4, 1],  # wide spread: not resolved
            "swin-cpvt": [10, 10, 10, 10, 10],  # fails the gate below
        },
        control={"swin-cpvt": 85.0},
    )
    found = {
        c.worse: verdict(c, records, REDUCED)[0]
        for c in CLAIMS
        if c.measure == "top1" and c.better == "sepvit"
    }
    assert found == {
        "avgpool": "reproduces",
        "dwconv": "contradicts",
        "dssa": "equivalent",
        "local": "not resolved",
        "swin-cpvt": "baseline failed",
    }
    # One paired seed is no comparison; a missing control run fails the gate.
    one_seed = [r for r in records if not (r["variant"] == "dssa" and r["seed"] > 0)]
    assert verdict(claim("sepvit", "dssa"), one_seed, REDUCED)[0] == "not comparable"
    no_control = [r for r in records if not (r["variant"] == "dssa" and r["task"] == "single")]
    assert verdict(claim("sepvit", "dssa"), no_control, REDUCED)[0] == "baseline failed"
    _, interval = verdict(claim("sepvit", "avgpool"), records, REDUCED)
    assert interval.mean == pytest.approx(5.0) and interval.count == 5


def test_report_writes_claims_tables_and_pictures(tmp_path):
    records = pilot_records() + main_records({"avgpool": [5, 6, 4, 5, 5], "local": [30, 31, 29, 30, 30]})
    records.append({**fake_record("cue", "sepvit", 0, 0.0), "protocol": "smoke"})  # another protocol
    records.append({**fake_record("cue", "sepvit", 1, 0.0), "fingerprint": "0" * 12})  # other settings
    speeds = {name: {"train": [100.0, 95.0, 105.0], "inference": [300.0, 290.0, 310.0]} for name in VARIANTS}
    speeds["dssa"]["train"] = [150.0, 140.0, 160.0]
    claims, plots = tmp_path / "paper_claims.md", tmp_path / "ablations"
    written = write_report(records, speeds, REDUCED, claims, plots, plots / "results.json")
    assert written == [claims, plots / "top1.png", plots / "curves.png", plots / "erf.png"]
    assert all(path.stat().st_size > 1000 for path in written[1:])
    markdown = claims.read_text()
    row = next(line for line in markdown.splitlines() if "(`sepvit` − `local`)" in line)
    assert "+30.0 [+29.1, +30.9] (n=5)" in row and row.endswith("**reproduces** |")
    assert "| Table 5 | DSSA trains faster than Swin + CPVT (`dssa` / `swin-cpvt`)" in markdown
    assert "×1.50 (medians) | **reproduces** |" in markdown
    assert "| `sepvit` | 80.0 [" in markdown  # the smoke record and the other settings' are left out
    assert "| sepvit (`sepvit`) | 60.0 | 80.0 | 60.0 | 0.001 |" in markdown
    assert "77.5%" in markdown and "![top1](ablations/top1.png)" in markdown


def independent_verdict(better: dict[int, float], worse: dict[int, float], effect: float) -> str:
    """The rule of docs/ablations.md, computed with scipy's t distribution."""
    paired = sorted(set(better) & set(worse))
    if len(paired) < 2:
        return "not comparable"
    differences = [better[s] - worse[s] for s in paired]
    mean = sum(differences) / len(differences)
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
    half = stats.t.ppf(0.975, len(differences) - 1) * sd / math.sqrt(len(differences))
    low, high = mean - half, mean + half
    if -effect < low and high < effect:
        return "equivalent"
    return "reproduces" if low > 0 else "contradicts" if high < 0 else "not resolved"


def test_published_verdicts_follow_from_the_published_results():
    """Every verdict on docs/paper_claims.md is what the stated rule gives on docs/ablations/results.json;
    the published study is the reduced protocol's, recorded as it goes."""
    results, claims = REPO / "docs" / "ablations" / "results.json", REPO / "docs" / "paper_claims.md"
    published = read_results(results).records
    assert published and all(REDUCED.holds(r) for r in published)
    records = report_module.main_records(published, REDUCED)
    lines = claims.read_text().splitlines()
    gate = report_module.gate_failures(records, REDUCED)
    for item in CLAIMS:
        line = next(line for line in lines if f"(`{item.better}` − `{item.worse}`)" in line
                    and report_module.MEASURES[item.measure] in line)  # fmt: skip
        shown = line.rsplit("|", 2)[-2].strip().strip("*")
        values = [
            report_module.by_seed(records, "cue", name, item.measure) for name in (item.better, item.worse)
        ]
        if not all(values):
            assert shown == "not run"
            continue
        if item.better in gate or item.worse in gate:
            assert shown == "baseline failed"
            continue
        effect = REDUCED.smallest_effect if item.measure == "top1" else report_module.ERF_EFFECT
        assert shown == independent_verdict(*values, effect), item.statement


# ---------------------------------------------------------------------------------------- the command


def test_ablate_writes_under_runs_by_default_and_into_docs_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "runs" / "ablations" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"records": pilot_records() + main_records({"local": [30] * 5})}))
    assert main(["ablate", "--report-only"]) == 0
    assert (tmp_path / "runs" / "ablations" / "paper_claims.md").exists()
    assert (tmp_path / "runs" / "ablations" / "top1.png").exists() and not (tmp_path / "docs").exists()
    published = tmp_path / "docs" / "ablations" / "results.json"
    published.parent.mkdir(parents=True)
    published.write_text(results.read_text())
    assert main(["ablate", "--report-only", "--publish"]) == 0
    assert (tmp_path / "docs" / "paper_claims.md").exists() and (
        tmp_path / "docs" / "ablations" / "erf.png"
    ).exists()
    capsys.readouterr()
    for bad in (["--threads", "0"], ["--jobs", "0"], ["--seeds", "-1"], ["--data-seed", "-2"]):
        with pytest.raises(SystemExit) as stopped:
            main(["ablate", "--report-only", *bad])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"sepvit ablate: error: argument {bad[0]}: must be at least"), error


def test_main_runs_without_a_pilot_are_refused_in_one_line_with_any_number_of_jobs(tmp_path, capsys):
    args = ["ablate", "--protocol", "smoke", "--phase", "main", "--runs", str(tmp_path / "runs")]
    for jobs in ("1", "2"):
        assert main([*args, "--jobs", jobs]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and "the pilot of the sepvit family has not run" in error[0], jobs
    assert not (tmp_path / "runs" / "results.json").exists()


def test_runs_folder_that_cannot_be_written_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    args = ["ablate", "--protocol", "smoke", "--runs", str(blocker), "--results", str(tmp_path / "r.json")]
    assert main([*args, "--claims", str(tmp_path / "claims.md"), "--phase", "pilot"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot write" in error[0] and "runs/data" in error[0]
    assert not (tmp_path / "r.json").exists()


def test_shards_side_by_side_record_every_run_once(tmp_path):
    """Three processes' worth of shards, run concurrently, merge every record into one file."""
    import threading
    import time

    def train(protocol, phase, run, runs_dir, device):
        time.sleep(0.01)  # let the shards' writes interleave
        task, variant, seed, lr = run
        return 0, fake_record(task, variant, seed, 50.0 + seed, lr=lr)

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"records": pilot_records()}))
    shards = [
        threading.Thread(
            target=run_study,
            args=(REDUCED, "main", results, tmp_path),
            kwargs={"seeds": (0, 1), "train": train, "shard": (k, 3)},
        )
        for k in range(3)
    ]
    for shard in shards:
        shard.start()
    for shard in shards:
        shard.join()
    plan = REDUCED.main_plan(chosen_lrs(pilot_records(), REDUCED), seeds=(0, 1))
    recorded = [
        (r["task"], r["variant"], r["seed"], r["lr"])
        for r in read_results(results).records
        if r["phase"] == "main"
    ]
    assert sorted(recorded) == sorted(plan)


def test_the_whole_study_runs_in_worker_processes_and_reports_once(tmp_path, capsys):
    """Pilot, main runs and throughput, two processes a phase, on the smoke protocol."""
    results, claims = tmp_path / "results.json", tmp_path / "claims.md"
    args = ["ablate", "--protocol", "smoke", "--tasks", "cue", "--variants", "sepvit", "local"]
    args += ["--runs", str(tmp_path / "runs"), "--results", str(results), "--claims", str(claims)]
    assert main([*args, "--jobs", "2"]) == 0
    recorded = read_results(results)
    assert {(r["phase"], r["variant"], r["seed"]) for r in recorded.records} == {
        ("pilot", "sepvit", 100), ("pilot", "local", 100),
        ("main", "sepvit", 0), ("main", "local", 0), ("main", "sepvit", 1), ("main", "local", 1),
    }  # fmt: skip
    assert len([r for r in recorded.records if r["phase"] == "pilot"]) == 2 * len(SMOKE.lrs)
    speeds = recorded.speeds["smoke"]
    assert set(speeds) >= {"sepvit", "local"} and speeds["sepvit"]["train"][0] > 0
    assert "| `sepvit` |" in claims.read_text()
    assert (tmp_path / "explain_1.png").stat().st_size > 1000  # the trained runs are at hand: pictures too
