"""`fpeft demo` / `make demo`: the whole pipeline on built-in synthetic data, CPU-sized.

Pre-trains on one traffic style (A: suburban), adapts to a small training split of another
(B: downtown) with Forecast-PEFT, Forecast-FT and the Forecast-MAE baseline, and compares them
with constant velocity on B's validation split.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from forecast_peft import stages
from forecast_peft.config import compose
from forecast_peft.reports import format_interval, half_width, scene_differences

CONFIG_FILE = "demo_config.yaml"  # the demo's own settings, in its run directory
VERDICTS = {"better": "beats", "worse": "is worse than", "unclear": "is not clearly better or worse than"}


def verdict(diff: float, ci95: float | None) -> str:
    """How a mean difference of errors (model - baseline, lower is better) reads with the
    half-width of its 95% interval: ``better`` or ``worse`` only when the interval excludes 0
    (``unclear`` without an interval: one shared scene)."""
    if ci95 is None:
        return "unclear"
    if diff + ci95 < 0:
        return "better"
    if diff - ci95 > 0:
        return "worse"
    return "unclear"


def run_demo(cfg: DictConfig) -> list[dict]:
    from forecast_peft.evaluation import BASELINES
    from forecast_peft.models.forecaster import TUNE_MODES

    d = cfg.demo
    root = Path(d.root)
    run_dir = Path(cfg.run_dir)
    runs = [run_dir / name for name in ("pretrain", *(f"tune_{mode}" for mode in TUNE_MODES))]
    if any(r.exists() for r in runs):
        print(f"demo: starting over in {run_dir} (the previous demo's runs are replaced)")
        for r in runs:
            shutil.rmtree(r, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    # not config.yaml: the evaluation it runs writes its own there, beside its report
    OmegaConf.save(cfg, run_dir / CONFIG_FILE)
    start = time.perf_counter()
    a, b = root / "suburban", root / "downtown"
    for out, style, split, n, seed in (
        (a, "suburban", "train", d.pretrain_scenarios, 1),
        (a, "suburban", "val", d.val_scenarios, 2),
        (b, "downtown", "train", d.tune_scenarios, 3),
        (b, "downtown", "val", d.val_scenarios, 4),
        (b, "downtown", "test", d.test_scenarios, 5),
    ):
        stages.synth(
            compose(
                "synth",
                [
                    f"synth.out={out}",
                    f"synth.style={style}",
                    f"synth.split={split}",
                    f"synth.num_scenarios={n}",
                    f"synth.seed={seed}",
                    f"synth.workers={d.workers}",
                ],
            )
        )
    for r in (a, b):
        stages.preprocess(compose("preprocess", [f"data.root={r}", f"data.preprocess_workers={d.workers}"]))
    common = [
        f"model={d.model}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.log_every_n_steps=5",
        f"optim.warmup_epochs={d.warmup_epochs}",
        "data.num_workers=1",
        f"trainer.check_val_every_n_epoch={d.val_every}",
        "trainer.enable_progress_bar=true",
    ]
    pre = stages.pretrain(
        compose(
            "pretrain",
            common
            + [
                f"data.root={a}",
                f"data.batch_size={d.pretrain_batch_size}",
                f"optim.lr={d.pretrain_lr}",
                f"trainer.max_epochs={d.pretrain_epochs}",
                f"run_dir={run_dir / 'pretrain'}",
            ],
        )
    )
    tuned = {}
    for mode in TUNE_MODES:
        extra = [f"tpp_epochs={d.tpp_epochs}"] if mode == "peft" else []
        res = stages.tune(
            compose(
                "tune",
                common
                + extra
                + [
                    f"data.root={b}",
                    f"mode={mode}",
                    f"pretrained={pre['last']}",
                    f"trainer.max_epochs={d.tune_epochs}",
                    f"data.batch_size={d.tune_batch_size}",
                    f"optim.lr={d.tune_lr[mode]}",
                    f"run_dir={run_dir / ('tune_' + mode)}",
                ],
            )
        )
        tuned[mode] = res["last"]  # not the best by val/minFDE6: the demo scores on that same split
    ckpts = "[" + ",".join(f"'{p}'" for p in tuned.values()) + "]"
    rows = stages.eval(
        # its run_dir is the demo's, where it writes (out: ${run_dir}), not a time-stamped one it never makes
        compose(
            "eval", [f"data.root={b}", f"checkpoints={ckpts}", f"run_dir={run_dir}", "data.num_workers=0", "plot=true"]
        )
    )
    stages.viz(
        compose(
            "viz",
            [
                f"data.root={b}",
                f"checkpoints={ckpts}",
                "num=4",
                f"out={run_dir / 'pictures'}",
                "data.num_workers=0",
            ],
        )
    )
    stages.predict(
        compose(
            "predict",
            [
                f"data.root={b}",
                f"checkpoint={tuned['peft']}",
                f"out={run_dir / 'submission.parquet'}",
                "data.num_workers=0",
            ],
        )
    )
    per_scene = pd.read_csv(run_dir / "per_scenario.csv")
    models = [r["name"] for r in rows if r["name"] not in BASELINES]
    summary = {}
    for base in (r["name"] for r in rows if r["name"] in BASELINES):
        summary[f"vs_{base}"] = {}
        for model in models:
            diff = scene_differences(per_scene, model, base)["minFDE6"]
            mean = float(diff.mean())
            ci = half_width(diff)
            summary[f"vs_{base}"][model] = {"minFDE6_diff": mean, "ci95": ci, "verdict": verdict(mean, ci)}
    summary["seconds"] = time.perf_counter() - start
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; report: {run_dir / 'report.json'}")
    for key in (k for k in summary if k.startswith("vs_")):
        for model, c in summary[key].items():
            diff = format_interval(c["minFDE6_diff"], c["ci95"])
            print(f"  {model}: {VERDICTS[c['verdict']]} {key[3:]} on minFDE6 (difference {diff} m, 95% interval)")
    return rows
