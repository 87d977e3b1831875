"""The settings each command's ``--help`` lists after its options: the Hydra overrides a user
reaches for first, with their defaults (``tests/test_cli.py`` checks each against the stage's
composed configuration, so the help cannot drift from ``conf/``)."""

from __future__ import annotations

DATA = [("data.root", "data/synth/a", "the dataset: split folders train/, val/, test/ of AV2 scenarios")]
CITIES = ("data.cities", "[]", "only these cities' scenarios, e.g. [miami] ([]: all)")
TRAINING = [
    *DATA,
    CITIES,
    ("trainer.max_epochs", "60", "epochs (the learning rate warms up, then decays to optim.min_lr)"),
    ("data.batch_size", "32", "scenes per training batch"),
    ("optim.lr", "0.001", "peak learning rate"),
    ("trainer.precision", "32-true", "bf16-mixed: the fast path on a GPU"),
    ("trainer.devices", "1", "devices per node (trainer.num_nodes for more nodes)"),
    ("compile", "false", "torch.compile the network: minutes to compile, faster steps on a GPU"),
    ("compile_mode", "default", "or max-autotune-no-cudagraphs (tries kernel variants while compiling)"),
    ("attention_kernel", "auto", "or, on a GPU, varlen / efficient / cudnn / flex (the same values, speed)"),
    ("early_stop_patience", "0", "stop after this many validation rounds without improvement (0: never)"),
    ("data.num_workers", "2", "DataLoader worker processes"),
    ("tensorboard", "false", "also log to RUN/tensorboard (needs pip install tensorboard)"),
    ("seed", "2024", "random seed (the training order, masks and initial weights)"),
    ("run_dir", "data/runs/<stage>/<time>", "where the run writes its config, logs and checkpoints"),
]
INFERENCE = [
    *DATA,
    ("data.eval_batch_size", "64", "scenes per batch"),
    ("device", "auto", "cuda where torch sees a GPU, else cpu"),
    ("compile", "false", "torch.compile the network: pays on large splits on a GPU"),
    ("compile_mode", "default", "max-autotune-no-cudagraphs, or reduce-overhead / max-autotune (CUDA graphs)"),
    ("attention_kernel", "auto", "or, on a GPU, varlen / efficient / cudnn / flex (the same values, speed)"),
]

OVERRIDES = {
    "convert": [
        ("convert.stride_s", "11.0", "seconds between a log's windows (less: overlapping scenarios)"),
        ("convert.focal_per_window", "1", "scenarios per window, one per focal agent"),
        ("convert.focal_by", "travel", "focal agents: travel (farthest), turn, speed_change or interaction"),
        ("convert.time_range_s", "null", "[start,end]: this part of each log only (seconds from its start)"),
        ("convert.focal_types", "[]", "the focal agents' types, e.g. [pedestrian,cyclist] ([]: every mover)"),
        ("convert.max_gap_s", "0.5", "gaps in a track up to this long are bridged by interpolation"),
        ("convert.lane_width_m", "3.5", "the width of a GeoJSON lane without a width property"),
        ("convert.origin", "null", "[x, y] taken from the tracks' and the map's coordinates (UTM's, ...)"),
        ("convert.workers", "2", "threads that write the scenario files"),
    ],
    "preprocess": [
        *DATA,
        ("data.cache_dir", "<data.root>/cache", "where the packed cache goes"),
        ("data.preprocess_workers", "2", "worker processes"),
        ("splits", "[train,val,test]", "the splits to extract (those present)"),
    ],
    "pretrain": [("model", "forecast_mae", "sizes: forecast_mae (published), small or tiny (CPU-sized)"), *TRAINING],
    "tune": [
        ("model.peft.num_prompts", "50", "prompt tokens per layer and mode (sizes: from --pretrained)"),
        ("model.peft.adapter_rank", "64", "the adapters' bottleneck width"),
        *TRAINING,
    ],
    "eval": [
        *INFERENCE,
        CITIES,
        (
            "baselines",
            "[constant_velocity,kinematic_modes,lane_following]",
            "simple predictors scored beside the checkpoints ([] for none)",
        ),
    ],
    "predict": INFERENCE,
    "deploy": [
        ("device", "auto", "where the program runs: cuda where torch sees a GPU, else cpu"),
        ("aoti", "false", "also NAME.aoti.pt2, compiled by AOTInductor for C++ (minutes; needs g++)"),
    ],
    "viz": [*DATA, CITIES],
    # the demo composes each stage's settings itself: only its own apply (it refuses others)
    "demo": [
        ("demo.root", "data/demo", "where the synthetic scenarios and their caches go"),
        ("demo.model", "tiny", "the model size (tiny, small or forecast_mae)"),
        ("demo.pretrain_epochs", "8", "pre-training epochs"),
        ("demo.tune_epochs", "8", "epochs of each tuning run (PEFT, FT, fine-tuning)"),
        ("demo.tune_lr.peft", "0.015", "PEFT's peak learning rate (.ft: FT's, .baseline: fine-tuning's)"),
        ("demo.pretrain_lr", "0.005", "pre-training's peak learning rate"),
        ("demo.workers", "2", "processes that write and cache the scenarios"),
        ("run_dir", "data/runs/demo", "where the runs, the report and the pictures go"),
    ],
}


WIDEST = 32  # the widest setting kept beside its text


def epilog(stage: str) -> str:
    """The ``--help`` text after a command's options: its common overrides, aligned."""
    settings = [(f"{key}={default}", text) for key, default, text in OVERRIDES[stage]]
    width = max(len(setting) for setting, _ in settings if len(setting) <= WIDEST)
    lines = []
    for setting, text in settings:  # a setting too wide for the column has its text below it
        lines += (
            [f"  {setting}", f"  {'':<{width}}  {text}"] if len(setting) > width else [f"  {setting:<{width}}  {text}"]
        )
    # "\b": click prints the block as it is instead of re-wrapping it into one paragraph
    return "\b\nCommon overrides, with their defaults (every setting: --print-config):\n" + "\n".join(lines)
