"""Compiled training, evaluation and pre-training (``compile=true``) on the CPU: slow (the
compilation takes minutes here), run by ``make test-slow``."""

import json

import pytest
import torch

from forecast_peft import config, stages
from forecast_peft.cli import main
from forecast_peft.data.dataset import ForecastDataset
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def test_compiled_tuning_and_evaluation(pretrained_ckpt, synth_root, tmp_path):
    base = TINY + [f"data.root={synth_root}", "mode=peft", f"pretrained={pretrained_ckpt}", "trainer.max_epochs=1"]
    result = stages.tune(config.compose("tune", base + ["compile=true", f"run_dir={tmp_path / 'run'}"]))
    module, _ = stages.load_tuned(result["last"])  # checkpoints carry no compile wrapper
    batch = ForecastDataset(synth_root / "cache", "val").__getitems__(list(range(8)))
    compiled = torch.compile(module.model.forward, dynamic=True)
    with torch.no_grad():
        eager, fast = module.model(batch), compiled(batch)
    torch.testing.assert_close(fast["y_hat"], eager["y_hat"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast["pi"], eager["pi"], rtol=1e-4, atol=1e-4)

    # compile_mode=reduce-overhead: fixed-shape batches on the padded layout (no CUDA graphs on a CPU)
    reports = {}
    # compile_mode=max-autotune-no-cudagraphs: compiled as compile=true on the CPU, whose autotuned
    # templates failed at the second batch size
    autotune = "compile_mode=max-autotune-no-cudagraphs"
    for setting in ("compile=false", "compile=true", "compile_mode=reduce-overhead", autotune):
        out = tmp_path / setting.replace("=", "-")
        args = ["eval", "-c", result["last"], f"data.root={synth_root}", "--out", str(out), setting]
        assert main(args + ["data.num_workers=0", "data.eval_batch_size=8"]) == 0
        (reports[setting],) = [r for r in json.loads((out / "report.json").read_text()) if r["name"].startswith("peft")]
    plain = reports.pop("compile=false")
    for report in reports.values():
        assert report["scenes"] == plain["scenes"] == 16
        assert abs(report["minFDE6"] - plain["minFDE6"]) < 1e-3 * plain["minFDE6"]


def test_compiled_pretraining_step_has_one_graph(synth_root):
    """MAE pre-training with its masks sampled on the host (as MAEModule hands them over) compiles
    to one graph (fullgraph: a break raises) for every batch shape, and gives the eager losses."""
    from forecast_peft.models.mae import MAE_MASKS, MAEModel, sample_masks
    from tests.test_models import tiny

    torch.manual_seed(0)
    model = MAEModel(tiny()).eval()  # no drop-path draws: eager and compiled see the same masks
    compiled = torch.compile(model.forward, dynamic=True, fullgraph=True)
    data = ForecastDataset(synth_root / "cache", "train")
    batches = [data.__getitems__(list(rows)) for rows in (range(6), range(6, 10))]
    assert batches[0]["x"].shape[:2] != batches[1]["x"].shape[:2]  # two batch shapes
    for batch in batches:
        batch[MAE_MASKS] = sample_masks(batch, model.cfg.mae)
        eager, fast = model(batch), compiled(batch)
        for key in ("future", "history", "lane", "loss"):
            torch.testing.assert_close(fast[key], eager[key], rtol=1e-4, atol=1e-4)
