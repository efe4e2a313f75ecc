"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sepvit.engine.checkpoint import read_checkpoint

# Runs Trainer in each process and saves that process's final weights (only rank 0 writes the run).
WORKER = """
import json, sys
from safetensors.torch import save_file
from sepvit.engine.distributed import init_distributed, shutdown
from sepvit.engine.loop import Trainer
from sepvit.classify.config import ClassifyConfig
from sepvit.classify.task import ClassificationTask

config = ClassifyConfig(**json.loads(sys.argv[1]))
context = init_distributed("cpu")
trainer = Trainer(config, ClassificationTask(config), context)
trainer.run()
state = {key: value.contiguous() for key, value in trainer.model.state_dict().items()}
save_file(state, f"{sys.argv[2]}/rank{context.rank}.safetensors")
shutdown(context)
"""

# Per-image augmentation is seeded by image index, so it may stay on; mixup and drop path draw
# per-process noise and are off. SGD keeps the rounding differences of summing gradients in another
# order as small as they are (Adam would magnify them on near-zero gradients).
RUN = dict(
    model="sepvit_lite",
    img_size=32,
    epochs=2,
    limit_train=32,
    limit_val=20,
    opt="sgd",
    lr=0.05,
    warmup_epochs=0.0,
    drop_path=0.0,
    mixup=0.0,
    cutmix=0.0,
    tensorboard=False,
    log_interval=100,
)


def _launch(tmp_path: Path, name: str, processes: int, batch_size: int) -> Path:
    out = tmp_path / name
    out.mkdir()
    config = json.dumps({**RUN, "batch_size": batch_size, "output": str(tmp_path), "experiment": name})
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    result = subprocess.run(
        [*launcher, str(script), config, str(out)], capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _val_metrics(run_dir: Path) -> list[tuple[float, float]]:
    with open(run_dir / "metrics.csv") as handle:
        return [(float(row["val_top1"]), float(row["val_loss"])) for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path) -> None:
    ddp = _launch(tmp_path, "ddp", processes=2, batch_size=8)
    single = _launch(tmp_path, "single", processes=1, batch_size=16)

    rank0, rank1 = load_file(ddp / "rank0.safetensors"), load_file(ddp / "rank1.safetensors")
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)

    reference = load_file(single / "rank0.safetensors")
    for key in reference:
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)
    saved, _ = read_checkpoint(ddp / "last.safetensors")
    assert all(torch.equal(saved[key], rank0[key]) for key in rank0)
    # validation metrics are reduced over both processes' halves of the 20 images
    for (ddp_top1, ddp_loss), (top1, loss) in zip(_val_metrics(ddp), _val_metrics(single)):
        assert ddp_top1 == pytest.approx(top1, abs=5 + 1e-6)
        assert ddp_loss == pytest.approx(loss, rel=1e-3)
