"""Many nodes: two torchrun "nodes" of one process each, joined by the c10d rendezvous on localhost,
train like one process with the same global batch, and evaluate shards exactly like one process."""

from __future__ import annotations

import inspect
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sepvit.cli import main
from sepvit.engine.distributed import DistContext

CPU = DistContext(0, 1, 0, torch.device("cpu"))


def train_and_evaluate(options: dict, out: str, shards: str, evaluated: str, workers: int, context) -> None:
    """Train in this process (one of a torchrun job or alone) and save its final weights; then
    evaluate the weights in ``evaluated`` (the single process's, so that both runs evaluate the same
    numbers) on the validation shards, spread over the processes and ``workers`` loader workers."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from sepvit.classify.config import ClassifyConfig
    from sepvit.classify.data import ClassifySample, eval_transform
    from sepvit.classify.task import ClassificationTask, classification_loader, evaluate
    from sepvit.engine.loop import Trainer
    from sepvit.engine.shards import ShardStream, open_shards

    config = ClassifyConfig(**options)
    task = ClassificationTask(config)
    trainer = Trainer(config, task, context)
    trainer.run()
    state = {key: value.contiguous() for key, value in trainer.model.state_dict().items()}
    save_file(state, f"{out}/rank{context.rank}.safetensors")
    trainer.model.load_state_dict(load_file(evaluated))
    decode = ClassifySample(eval_transform(task.data_config))
    loader = classification_loader(
        ShardStream(open_shards(shards, "val"), decode, False), 7, workers, context
    )
    metrics = evaluate(trainer.model, loader, context, collect=True)
    metrics.update(predictions=metrics["predictions"].tolist(), targets=metrics["targets"].tolist())
    Path(f"{out}/eval{context.rank}.json").write_text(json.dumps(metrics))


WORKER = f"""
import json, sys
from sepvit.engine.distributed import init_distributed, shutdown
{inspect.getsource(train_and_evaluate)}
context = init_distributed("cpu")
train_and_evaluate(json.loads(sys.argv[1]), *sys.argv[2:5], int(sys.argv[5]), context)
shutdown(context)
"""

# Mixup and drop path draw per-process noise and are off; SGD keeps the rounding differences of
# summing gradients in another order as small as they are.
RUN = dict(
    model="test_vit", img_size=32, epochs=2, limit_train=32, limit_val=20, opt="sgd", lr=0.05,
    warmup_epochs=0.0, drop_path=0.0, mixup=0.0, cutmix=0.0, tensorboard=False, log_interval=100,
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _arguments(tmp_path: Path, name: str, batch_size: int, shards: Path) -> tuple[dict, str, str, str]:
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    options = {**RUN, "batch_size": batch_size, "output": str(tmp_path), "experiment": name}
    return options, str(out), str(shards), str(tmp_path / "single" / "rank0.safetensors")


@pytest.fixture(scope="module")
def val_shards(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = digits_folder
    out = tmp_path_factory.mktemp("packed") / "shards"
    assert main(["data", "pack", str(folder), str(out), "--shard-size", "50"]) == 0
    return out


@pytest.mark.slow
def test_two_nodes_train_like_one_process_and_evaluate_shards_exactly(
    tmp_path: Path, val_shards: Path, one_thread
) -> None:
    train_and_evaluate(*_arguments(tmp_path, "single", 16, val_shards), 0, CPU)

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    options, *paths = _arguments(tmp_path, "nodes", 8, val_shards)
    port = _free_port()
    # What each node of a cluster runs (one process per node here): the same command on every node.
    torchrun = "-m torch.distributed.run --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint"
    command = [
        sys.executable,
        *torchrun.split(),
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "two-nodes",
        str(script),
        json.dumps(options),
    ]
    nodes = [
        subprocess.Popen([*command, *paths, "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(logs)
    log = "\n".join(logs)
    assert "world size 2, per-process batch 8, accumulation 1, effective batch 16, lr 0.05 (given)" in log
    assert "img/s in total; per process (rank order): " in log

    out = tmp_path / "nodes"
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    reference = load_file(tmp_path / "single" / "rank0.safetensors")
    for key in reference:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)

    alone = json.loads((tmp_path / "single" / "eval0.json").read_text())
    shares = [json.loads((out / f"eval{rank}.json").read_text()) for rank in range(2)]
    assert alone["count"] == 360 and sum(len(share["targets"]) for share in shares) == 360
    for share in shares:  # every process reports the reduced metrics of all 360 images
        assert (share["count"], share["top1"], share["top5"]) == (
            alone["count"],
            alone["top1"],
            alone["top5"],
        )
        assert share["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    pairs = sorted(zip(alone["targets"], alone["predictions"]))
    assert sorted(pair for share in shares for pair in zip(share["targets"], share["predictions"])) == pairs


def test_sync_bn_with_several_cpu_processes_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from sepvit.classify.config import ClassifyConfig
    from sepvit.classify.task import ClassificationTask
    from sepvit.engine.loop import Trainer
    from sepvit.errors import ConfigError

    config = ClassifyConfig(model="sv_efficientvit_m0", sync_bn=True, output=str(tmp_path), lr=1e-3)
    with pytest.raises(ConfigError, match="--sync-bn needs GPUs"):
        Trainer(config, ClassificationTask(config), DistContext(0, 2, 0, torch.device("cpu")))
    assert not list(tmp_path.iterdir())
