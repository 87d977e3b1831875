import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = ROOT.parent / "shared" / "av2_sample"
TINY = [
    "model=tiny",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "optim.warmup_epochs=1",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.preprocess_workers=1",
]


def pytest_configure(config) -> None:
    """In each of ``make test``'s processes (pytest-xdist's workers), torch's threads are its share of
    the cores, also in the commands a test starts; set before torch is imported. On 2 cores, 2
    processes ran the suite in 4:42 with a thread each and in 14:12 with two each (their OpenMP
    threads waited on each other). A thread count set in the environment is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def rounded_slots(rounded: list[dict], plain: list[dict], multiple: int) -> list[tuple[int, int]]:
    """The (actor, lane) slots of each batch of ``rounded``, checked to be those of the same batch
    of ``plain`` (the same scenes, slots not rounded) rounded up to a multiple of ``multiple``, some
    of them changed by it."""
    shapes = [[(b["x"].shape[1], b["lane_positions"].shape[1]) for b in batches] for batches in (rounded, plain)]
    assert len(shapes[0]) == len(shapes[1]) and shapes[0] != shapes[1]
    for (n, m), (real_n, real_m) in zip(*shapes, strict=True):
        assert n % multiple == 0 and m % multiple == 0
        assert real_n <= n < real_n + multiple and real_m <= m < real_m + multiple
    return shapes[0]


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    scenario = next((SHARED_SAMPLE / "val").iterdir(), None) if (SHARED_SAMPLE / "val").is_dir() else None
    if scenario is None:
        pytest.fail(f"the shared AV2 sample is missing: expected it at {SHARED_SAMPLE}")
    return scenario


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (downtown style) with train/val/test, preprocessed."""
    from forecast_peft.data.preprocess import preprocess
    from forecast_peft.data.synth.generate import generate

    root = tmp_path_factory.mktemp("synth")
    for split, n in (("train", 24), ("val", 16), ("test", 6)):
        generate(root, split, n, seed=7, style="downtown", progress=False)
    preprocess(root, root / "cache", ["train", "val", "test"], workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def pretrained_ckpt(synth_root, tmp_path_factory) -> Path:
    from forecast_peft import config, stages

    run = tmp_path_factory.mktemp("pretrain")
    cfg = config.compose("pretrain", TINY + [f"data.root={synth_root}", "trainer.max_epochs=1", f"run_dir={run}"])
    return Path(stages.pretrain(cfg)["last"])


def full_disk_at(monkeypatch, call: int) -> tuple[list, object]:
    """Scenario files' parquet writes (``av2_format``) that fail as pyarrow does on a full disk (an
    OSError without errno) at the ``call``-th one; returns the list of paths asked for and the
    real writer, to put back."""
    from forecast_peft.data import av2_format

    real, calls = av2_format.pq.write_table, []

    def write_table(table, path):
        calls.append(path)
        if len(calls) == call:
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
        real(table, path)

    monkeypatch.setattr(av2_format.pq, "write_table", write_table)
    return calls, real
