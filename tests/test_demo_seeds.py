"""benchmarks/demo_seeds.py on 2 seeds and a few images, and the digits validation carve-out it uses.

Checks that the script works (per-seed results, consistent summary, baselines, failures reported),
not the accuracy targets: those need the whole recipe (docs/training.md).
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from sepvit.classify.data import DIGITS, DIGITS_VAL, digits_split_indices, load_image_sets

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_seeds.py"
# One epoch on 64 training images: seconds per seed, enough to exercise the whole path.
SHORT_DEMO = ["--epochs", "1", "--limit-train", "64", "--batch-size", "32"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def load_script():
    spec = importlib.util.spec_from_file_location("demo_seeds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_validation_split_is_carved_from_train_and_never_touches_test() -> None:
    labels = load_digits().target
    train, test = digits_split_indices(DIGITS)
    fit, val = digits_split_indices(DIGITS_VAL)
    assert (len(train), len(test), len(fit), len(val)) == (1437, 360, 1149, 288)
    assert not set(fit) & set(val)
    assert set(fit) | set(val) == set(train)
    assert not (set(fit) | set(val)) & set(test)
    # stratified: every class holds about a fifth of its training images out
    for digit in range(10):
        in_train, in_val = (labels[train] == digit).sum(), (labels[val] == digit).sum()
        assert abs(in_val - 0.2 * in_train) <= 1, digit
    # fixed: the same split every time
    again_fit, again_val = digits_split_indices(DIGITS_VAL)
    assert np.array_equal(fit, again_fit) and np.array_equal(val, again_val)


def test_validation_images_are_the_carved_digits() -> None:
    digits = load_digits()
    fit, val = digits_split_indices(DIGITS_VAL)
    train_set, val_set = load_image_sets(DIGITS_VAL, 8)  # 8 px: the original pixels, no resampling
    assert train_set.labels == digits.target[fit].tolist() and val_set.labels == digits.target[val].tolist()
    ink = 255 - np.asarray(val_set.items[5].convert("L"), dtype=np.float64)
    assert np.allclose(ink * 16 / 255, digits.images[val[5]], atol=0.1)


@pytest.mark.slow
def test_two_short_seeds_report_per_seed_results_summary_and_baselines(tmp_path: Path) -> None:
    report_path = tmp_path / "seeds.json"
    result = run_script(
        "--seeds", "0-1", "--data", DIGITS_VAL, "--output", str(tmp_path / "runs"),
        "--json", str(report_path), "--ensembles", "2", *SHORT_DEMO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(report_path.read_text())
    runs = report["runs"]
    assert [run["seed"] for run in runs] == [0, 1] and report["demo_args"] == SHORT_DEMO
    for run in runs:
        assert run["images"] == 288  # the validation carve-out, not the 360 test images
        assert 0.0 <= run["top1"] <= 100.0 and run["seconds"] > 0 and run["train_images_per_s"] > 0
        assert run["errors"] == round(288 * (100 - run["top1"]) / 100)
        log = (tmp_path / "runs" / f"seed{run['seed']}.log").read_text()
        assert "train: the first 64 images" in log and "val: 288 images" in log
        assert f"validation top-1 {run['top1']:.2f}%" in log
        assert (tmp_path / "runs" / f"seed{run['seed']}" / "last_ema.safetensors").is_file()
    values = [run["top1"] for run in runs]
    summary = report["summary"]
    assert summary["mean"] == pytest.approx(statistics.fmean(values))
    assert summary["std"] == pytest.approx(statistics.stdev(values))
    assert (summary["min"], summary["max"]) == (min(values), max(values))
    assert summary["seconds_mean"] == pytest.approx(statistics.fmean(run["seconds"] for run in runs))

    fixed, tuned = report["baselines"]
    assert (fixed["C"], fixed["gamma"]) == (1.0, 0.001)
    for baseline in (fixed, tuned):
        assert baseline["top1"] == pytest.approx(100 * (288 - baseline["errors"]) / 288)
        assert baseline["top1"] > 95.0  # an SVM on raw pixels does well on digits

    screen = result.stdout
    for run in runs:
        assert f"| {run['seed']} | {run['top1']:.2f} | {run['errors']} |" in screen
    assert f"top-1 mean {summary['mean']:.2f}% ± {summary['std']:.2f}" in screen
    assert f"min {summary['min']:.2f}%, max {summary['max']:.2f}%" in screen
    assert f"{fixed['top1']:.2f}% validation top-1" in screen

    # The pair's averaged probabilities, recomputed here from each run's own evaluation: the
    # helper's single-seed errors are the demo's own, and the pair's are the argmax of the mean.
    script = load_script()
    probabilities = []
    for run in runs:
        seed_probabilities, labels = script.evaluation_probabilities(
            tmp_path / "runs" / f"seed{run['seed']}", DIGITS_VAL
        )
        assert seed_probabilities.shape == (288, 10)
        assert int((seed_probabilities.argmax(-1) != labels).sum()) == run["errors"]
        probabilities.append(seed_probabilities.numpy())
    pair_errors = int((np.mean(probabilities, axis=0).argmax(-1) != labels.numpy()).sum())
    (pair,) = report["ensembles"]
    assert pair == {
        "size": 2,
        "ensembles": 1,
        "errors": {str(pair_errors): 1},
        "mean": pair_errors,
        "max": pair_errors,
    }
    assert f"ensembles of 2 seeds (their probabilities averaged), all 1: errors {pair_errors} ×1" in screen


def test_a_failing_run_is_reported_and_the_script_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert load_script().main(["--seeds", "3", "--output", str(tmp_path), "--epochs", "0"]) == 1
    screen = capsys.readouterr().out
    assert "| 3 | failed: exit code 2: " in screen and "--epochs must lie in [1, inf], got 0" in screen


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seeds", "2-x"], "bad seed"),
        (["--seeds", "1", "0-2"], "seeds must be given once each"),
        (["--seeds", "0-1", "--ensembles", "3"], "--ensembles takes sizes from 2 to the number of seeds (2)"),
        (["--seeds", "0-1", "--ensembles", "1"], "--ensembles takes sizes from 2"),
    ],
)
def test_bad_options_are_refused(arguments: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(arguments)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
