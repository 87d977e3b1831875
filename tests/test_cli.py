import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from forecast_peft import config
from forecast_peft.cli import app, main
from forecast_peft.cli_help import OVERRIDES
from forecast_peft.errors import ConfigError, UserError
from tests.conftest import TINY

STAGES = ("synth", "convert", "preprocess", "pretrain", "tune", "eval", "predict", "deploy", "viz", "runs")
runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.output


def test_version_and_the_source_commit(tmp_path, capsys):
    """``fpeft --version`` names forecast-peft's version, the git commit of a checkout's source
    (``-dirty`` where a tracked file differs from it; None outside a checkout) and torch's."""
    import subprocess

    import forecast_peft
    from forecast_peft.provenance import SOURCE_ROOT, source_commit

    assert main(["--version"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith(f"forecast-peft {forecast_peft.__version__}") and f"torch {torch.__version__} (" in second
    if source_commit(SOURCE_ROOT):  # this checkout
        assert f"(source: git {source_commit(SOURCE_ROOT)})" in first

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert source_commit(tmp_path) is None  # not a checkout
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "first")
    (tmp_path / "a.py").write_text("1\n")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert source_commit(tmp_path) == head.strip()  # an untracked file changes nothing
    git("add", "a.py")
    assert source_commit(tmp_path) == head.strip() + "-dirty"


@pytest.mark.parametrize(
    "argv, code, absent",
    [
        (["--version"], 0, ("pytorch_lightning", "hydra", "av2")),
        (["runs", "."], 0, ("torch", "pytorch_lightning")),
        (["tune", "lr=1"], 2, ("torch", "pytorch_lightning")),
        (["eval", "-c", "missing.ckpt"], 1, ("torch", "pytorch_lightning")),
        (["predict", "-c", "missing.ckpt", "compile_mode=fast"], 2, ("torch", "pytorch_lightning")),
    ],
)
def test_commands_typed_by_hand_answer_without_the_heavy_imports(argv, code, absent, tmp_path):
    """``fpeft --version`` reads Lightning's version from its package metadata (importing
    Lightning took 3 of its 4.7 s on this CPU); ``fpeft runs``, a mistyped key, and eval's and
    predict's checks of their checkpoints and network settings need neither torch nor Lightning
    (the check of data.eval_order once imported torch for every stage, a second of ``fpeft
    runs``'s 2; those of compile_mode and attention_kernel, 1.5 s of eval's 1.9 with a missing
    checkpoint). ``make bench-cli`` times them."""
    import subprocess
    import sys

    script = (
        f"import sys\nfrom forecast_peft.cli import main\ncode = main({argv!r})\n"
        f"print(sorted(m for m in {absent!r} if m in sys.modules))\nsys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "[]"
    if argv == ["--version"]:
        assert "pytorch-lightning " in done.stdout


def test_fpeft_alone_prints_its_help_not_an_error(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("Usage: fpeft [OPTIONS] COMMAND") and "--version" in out and err == ""


@pytest.mark.parametrize("stage", STAGES + ("demo",))
def test_stage_help(stage):
    result = runner.invoke(app, [stage, "--help"])
    assert result.exit_code == 0
    assert "--print-config" in result.output


def _as_override(value) -> str:
    """A composed value as an override writes it (false, [a,b], 0.001, null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if OmegaConf.is_list(value):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


@pytest.mark.parametrize("stage", sorted(OVERRIDES))
def test_help_lists_common_overrides_with_the_defaults_the_stage_composes(stage):
    """Each command's --help ends with its common overrides; each key exists in the stage's
    configuration and the default it shows is the one composed (<...> stands for a value made
    from others: the data root, the stage, the time)."""
    cfg = config.compose(stage)
    output = runner.invoke(app, [stage, "--help"], terminal_width=200).output
    assert "Common overrides, with their defaults (every setting: --print-config):" in output
    for key, default, text in OVERRIDES[stage]:
        assert f"{key}={default}" in output and text in output
        if key == "model":  # a config group: its choice shows in its sizes
            assert cfg.model.embed_dim == config.group_option("model", default).embed_dim
            continue
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        assert value is not None or default == "null", key
        made = default.replace("<stage>", stage)
        if "<data.root>" in made:  # the demo has no data settings of its own
            made = made.replace("<data.root>", str(cfg.data.root))
        if "<time>" in made:
            assert _as_override(value).startswith(made.split("<time>")[0]), key
        else:
            assert _as_override(value) == made, key


@pytest.mark.parametrize("stage", config.STAGES)
def test_every_stage_composes(stage):
    cfg = config.compose(stage)
    assert cfg.stage == stage
    assert str(cfg.run_dir).startswith("data/runs/") or stage == "demo"


def test_overrides_and_trainer_arguments(capsys):
    code = main(
        [
            "pretrain",
            "--print-config",
            "data.root=somewhere",
            "trainer.max_epochs=2",
            "trainer.fast_dev_run=true",
            "trainer.devices=4",
            "trainer.accumulate_grad_batches=3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "root: somewhere" in out and "cache_dir: somewhere/cache" in out
    assert "max_epochs: 2" in out and "fast_dev_run: true" in out
    assert "devices: 4" in out and "accumulate_grad_batches: 3" in out


def test_typer_options_become_overrides(capsys):
    assert main(["tune", "--print-config", "--mode", "ft", "--tpp-epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "mode: ft" in out and "tpp_epochs: 3" in out


def test_an_override_where_a_path_argument_may_stand(capsys):
    """`fpeft synth synth.seed=3` and `fpeft runs runs_root=DIR`: key=value is an override, not the path."""
    assert main(["synth", "--print-config", "synth.seed=3"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "out: synth.seed=3" not in out
    assert main(["runs", "--print-config", "runs_root=elsewhere"]) == 0
    assert "root: elsewhere" in capsys.readouterr().out
    assert main(["synth", "here", "--print-config", "synth.seed=3"]) == 0
    assert "out: here" in capsys.readouterr().out


def test_a_home_path_after_equals_is_expanded(tmp_path, monkeypatch, capsys):
    """`data.root=~/av2`: the shell leaves that ~ (after a dotted key) to the program, and Hydra's
    grammar failed on it with a LexerNoViableAltException; `~key` still deletes a key."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["eval", "--print-config", "data.root=~/av2", "out=~"]) == 0
    out = capsys.readouterr().out
    assert (
        f"root: {tmp_path}/av2\n" in out and f"cache_dir: {tmp_path}/av2/cache\n" in out and f"out: {tmp_path}\n" in out
    )
    assert main(["tune", "-m", "--print-config", "seed=1,2", "data.root=~/a"]) == 0  # a sweep's too
    assert f"seed=2: data.root={tmp_path}/a seed=2\n" in capsys.readouterr().out
    assert config.expand_home(["pretrained=~/p/seed=1,~/p/seed=2", "~seed", "x=a~", "y=choice(~/a,~)", "z=[~/b]"]) == [
        f"pretrained={tmp_path}/p/seed=1,{tmp_path}/p/seed=2",
        "~seed",
        "x=a~",
        f"y=choice({tmp_path}/a,{tmp_path})",
        f"z=[{tmp_path}/b]",
    ]


def test_configs_found_from_any_directory(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["eval", "--print-config", "split=train"]) == 0
    finally:
        os.chdir(cwd)
    assert "split: train" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["nope"], "No such command"),
        (["pretrain", "--bogus"], "No such option"),
        (["pretrain", "foo=1"], "unknown key 'foo'"),
        (["pretrain", "data.rooot=x"], "unknown key 'data.rooot' (did you mean 'data.root'?)"),
        (["tune", "model.peft.adapter_rnk=3"], "(did you mean 'model.peft.adapter_rank'?)"),
        (["tune", "lr=1e-3"], "unknown key 'lr' (did you mean 'optim.lr'?)"),  # the one key of that last name
        (["tune", "device=cuda"], "unknown key 'device' (did you mean 'trainer.accelerator'?)"),
        (["eval", "accelerator=gpu"], "unknown key 'accelerator' (did you mean 'device'?)"),
        (["demo", "demo.lr=1e-3"], "'demo.lr' is gone: set demo.pretrain_lr (pre-training) and demo.tune_lr.peft"),
        (["tune", "depth=3"], "unknown key 'depth'\n"),  # no key of that last name, none spelt close
        (["tune", "model=huge"], "unknown model 'huge' (choose one of forecast_mae, small, tiny)"),
        (["pretrain", "trainer.not_a_trainer_arg=1"], "not_a_trainer_arg"),
        (["pretrain", "a=["], "bad configuration"),
        (["pretrain", "justaword"], "malformed override 'justaword': expected key=value\n"),
        # a path where an override goes: which option takes it
        (["eval", "runs/tune/best.ckpt"], "expected key=value; give a path as -c CKPT (repeatable) or data.root=DIR"),
        (["tune", "runs/pretrain"], "give a path as --pretrained CKPT, --resume RUN (a run to continue) or data."),
        (["tune", "pretrained=runs/seed=1"], "quote the value: \"pretrained='runs/seed=1'\""),
        (["tune", "trainer.max_epochs=-1"], "trainer.max_epochs must be a number of epochs (>= 0), got -1"),
        (["tune", "early_stop_patience=2", "trainer.limit_val_batches=0"], "trainer.limit_val_batches=0 turns"),
        (["pretrain", "trainer.precision=16-true"], "trainer.precision=16-true cannot train here: AdamW's eps"),
        (["pretrain", "trainer.max_epochs=null"], "trainer.max_epochs must be a number of epochs (>= 0), got None"),
        (["tune", "trainer.logger=false"], "trainer.logger is set by fpeft (the run's CSV logs"),
        (["tune", "trainer.callbacks=null"], "trainer.callbacks is set by fpeft"),
        (["pretrain", "trainer.default_root_dir=x"], "set it with run_dir="),
        (["pretrain", "trainer.enable_checkpointing=false"], "trainer.enable_checkpointing is set by fpeft"),
        (["pretrain", "trainer.num_nodes=0"], "bad trainer configuration: `num_nodes` must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "value", ["runs/seed=1", "/data/av2 (copy)", "/data/a#b", "/data/a{1}", "/data/münchen", "/data/it's"]
)
def test_the_quoting_advice_reads_when_pasted_into_a_shell(value, capsys):
    """A value whose characters Hydra's grammar reads as syntax: the advice names the override,
    and its quoted form, as the shell passes it on (shlex.split), composes with that value."""
    import shlex

    assert main(["eval", "--print-config", f"data.root={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fpeft: error: bad configuration for 'eval': data.root={value}: Hydra's override grammar")
    assert len(err.strip().splitlines()) == 1
    (advice,) = shlex.split(err.split("quote the value: ", 1)[1])
    assert config.compose("eval", [advice]).data.root == value


def test_user_error_from_a_stage_is_one_line(tmp_path, capsys):
    code = main(["preprocess", f"data.root={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 1 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_a_file_system_refusal_is_one_line_naming_the_path(synth_root, tmp_path, capsys):
    (tmp_path / "a_file").touch()
    cache = tmp_path / "a_file" / "cache"  # a cache under a regular file cannot be made
    code = main(["preprocess", f"data.root={synth_root}", f"data.cache_dir={cache}", "data.preprocess_workers=1"])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot write the cache {cache} (Not a directory): set data.cache_dir=" in err
    assert len(err.strip().splitlines()) == 1
    out = tmp_path / "a_file" / "reports"  # any other refusal: the path, then the file system's own words
    code = main(["eval", f"data.root={synth_root}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err == f"fpeft: error: {out}: not a directory\n"  # was "[Errno 20] Not a directory: '...'"


def test_run_dir_gets_the_composed_config(tmp_path):
    cfg = config.compose("pretrain", [f"run_dir={tmp_path / 'run'}"])
    path = config.make_run_dir(cfg)
    assert (path / "config.yaml").read_text().count("max_epochs") == 1


def test_a_run_directory_is_never_shared(tmp_path):
    """A run_dir given again is refused once it holds a checkpoint to resume (a new run would
    overwrite it); runs started in the same second (default time-stamped names) get their own."""
    cfg = config.compose("pretrain", [f"run_dir={tmp_path / 'run'}"])
    config.make_run_dir(cfg)
    config.make_run_dir(cfg)  # stopped before its first epoch ended: nothing to resume, run it again
    from forecast_peft.training import resolve_resume

    with pytest.raises(UserError, match="nothing to resume: .* run the same command without --resume"):
        resolve_resume(config.compose("pretrain", [f"resume={tmp_path / 'run'}"]))
    # a path that does not exist: said when the command is composed, before the data root is looked at
    missing = re.escape(f"nothing to resume: {tmp_path / 'rnu'} does not exist (`fpeft runs` lists the runs)")
    with pytest.raises(UserError, match=missing):
        config.compose("pretrain", [f"resume={tmp_path / 'rnu'}", "data.root=/no/data"])
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "last.ckpt").touch()
    with pytest.raises(ConfigError, match=f"run_dir {tmp_path / 'run'} already holds a run: `fpeft pretrain --resume"):
        config.make_run_dir(config.compose("pretrain", [f"run_dir={tmp_path / 'run'}"]))
    same_second = [config.compose("pretrain", [f"runs_root={tmp_path}"]) for _ in range(3)]
    for cfg in same_second:
        cfg.run_dir = same_second[0].run_dir
    made = [config.make_run_dir(cfg) for cfg in same_second]
    first = Path(same_second[0].run_dir)
    assert made == [first, first.with_name(first.name + "-2"), first.with_name(first.name + "-3")]
    for path in made:
        assert OmegaConf.load(path / "config.yaml").run_dir == str(path)


@pytest.mark.parametrize(
    "stage, override, needle",
    [
        ("tune", "data.batch_size=abc", "data.batch_size must be an integer, got 'abc'"),
        ("tune", "data.batch_size=0", "data.batch_size must be >= 1, got 0"),
        ("tune", "data.num_workers=-1", "data.num_workers must be >= 0"),
        ("eval", "data.slot_multiple=0", "data.slot_multiple must be >= 1, got 0"),
        ("predict", "data.slot_multiple=eight", "data.slot_multiple must be an integer, got 'eight'"),
        ("tune", "data.train_fraction=1.5", "data.train_fraction must be in (0, 1]"),
        ("tune", "optim.lr=abc", "optim.lr must be a number"),
        ("tune", "optim.lr=0", "optim.lr must be > 0"),
        ("tune", "optim.lr=1e-7", "optim.min_lr (1e-06) must not exceed optim.lr (1e-07)"),
        ("tune", "compile=maybe", "compile must be true or false, got 'maybe'"),
        # settings whose default is null take null or their own kind
        ("convert", "convert.origin=5", "convert.origin must be a list (a number each) or null, got 5"),
        ("convert", "convert.time_range_s=[a,b]", "convert.time_range_s must be a list (a number each) or null"),
        ("convert", "convert.focal_by=near", "convert.focal_by must be one of travel, turn, speed_change, interaction"),
        ("tune", "tpp_epochs=1.5", "tpp_epochs must be an integer"),
        ("tune", "model.embed_dim=abc", "model.embed_dim must be an integer"),
        ("tune", "model.embed_dim=30", "multiple of model.num_heads"),
        ("tune", "model.agent.widths=[8,16]", "one entry per level"),
        ("tune", "model.agent.widths=[16,32,64]", "must end at model.embed_dim (128)"),
        ("tune", "model.drop_path=1.0", "model.drop_path must be in [0, 1)"),
        ("tune", "+model.agent.depth=3", "bad model configuration"),
        ("pretrain", "trainer.max_epochs=abc", "trainer.max_epochs must be an integer or null, got 'abc'"),
        ("pretrain", "trainer.precision=bf17", "trainer.precision must be one of"),
        ("pretrain", "trainer.deterministic=sometimes", "trainer.deterministic must be"),
        ("pretrain", "trainer.accumulate_grad_batches=2.5", "trainer.accumulate_grad_batches must be an integer"),
        ("preprocess", "splits=train", "splits must be a list, e.g. splits=[train]"),
        ("tune", "data.cities=miami", "data.cities must be a list, e.g. data.cities=[miami], got 'miami'"),
        ("eval", "data.cities=[miami,2]", "data.cities must list city names, e.g. data.cities=[miami,austin], got 2"),
        (
            "predict",
            "data.cities=[miami]",
            "data.cities=[miami] leaves scenarios out, and `fpeft predict` writes a leaderboard submission, which "
            "forecasts every scenario of the split: drop data.cities",
        ),
        # read only when the loaders are made, after the cache is brought up to date: checked first
        ("pretrain", "data.train_order=sorted", "data.train_order must be one of random, bucket, got 'sorted'"),
        ("eval", "data.eval_order=random", "data.eval_order must be one of size, dataset, got 'random'"),
        ("tune", "data.worker_start=thread", "data.worker_start must be one of auto, forkserver, spawn, fork"),
        ("eval", "baselines=kinematic_modes", "baselines must be a list"),
        ("viz", "num=0", "num must be >= 1"),
        ("tune", "seed=-1", "seed must be in [0, 2**32), got -1"),
        ("pretrain", "seed=4294967296", "seed must be in [0, 2**32), got 4294967296"),
        ("tune", "data.subset_seed=-3", "data.subset_seed must be in [0, 2**32), got -3"),
        ("tune", "trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be >= 0, got -1"),
        ("synth", "synth.num_scenarios=many", "synth.num_scenarios must be an integer"),
        ("demo", "data.slot_multiple=1", "fpeft demo sets each stage's settings itself and would ignore"),
        ("demo", "model=small", "would ignore 'model=small': it takes demo.* settings"),
        ("demo", "+trainer.max_time=1", "would ignore '+trainer.max_time=1'"),
        (
            "eval",
            "trainer.precision=bf16-mixed",
            "fpeft eval trains nothing and would ignore 'trainer.precision=bf16-mixed', a Lightning Trainer "
            "setting: its own settings are device=, precision=, compile=, data.eval_batch_size=",
        ),
        ("predict", "trainer.accelerator=gpu", "fpeft predict trains nothing and would ignore 'trainer.accelerator"),
        ("viz", "data.batch_size=256", "would ignore 'data.batch_size=256', the training batch size: its own settings"),
        (
            "eval",
            "data.train_fraction=0.1",
            "fpeft eval trains nothing and would ignore 'data.train_fraction=0.1', the tr",
        ),
        (
            "predict",
            "data.shuffle=false",
            "would ignore 'data.shuffle=false', the training order: its own settings are",
        ),
        (
            "preprocess",
            "data.num_workers=16",
            "fpeft preprocess trains nothing and would ignore 'data.num_workers=16', a setting of the stages that "
            "read the cache: its own settings are data.root=, data.cache_dir=, data.preprocess_workers=, "
            "data.shard_size=, splits=",
        ),
        ("preprocess", "trainer.devices=2", "fpeft preprocess trains nothing and would ignore 'trainer.devices=2'"),
        (
            "synth",
            "trainer.max_epochs=3",
            "would ignore 'trainer.max_epochs=3', a Lightning Trainer setting: its own settings are synth.out=, "
            "synth.split=, synth.num_scenarios=, synth.seed=, synth.style=, synth.workers=",
        ),
        ("runs", "+trainer.max_time=1", "fpeft runs trains nothing and would ignore '+trainer.max_time=1'"),
    ],
)
def test_bad_values_fail_in_one_line_before_any_work(stage, override, needle, capsys):
    out_dir = ["data/synth/x"] if stage == "synth" else []  # synth's positional OUT comes first
    code = main([stage, "--print-config", *out_dir, override])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "stage, overrides",
    [
        ("tune", ["optim.lr=1", "model=tiny", "model.embed_dim=64", "model.agent.widths=[16,32,64]"]),
        ("pretrain", ["trainer.devices=2", "trainer.precision=bf16-mixed", "trainer.max_epochs=0"]),
        ("tune", ["trainer.enable_model_summary=true", "trainer.strategy=ddp", "trainer.accelerator=cpu"]),
        ("pretrain", ["trainer.deterministic=warn", "trainer.limit_train_batches=0.5", "trainer.max_time=00:01:00:00"]),
        ("tune", ["pretrained=some/run", "model=tiny", "resume=null", "data.train_fraction=0.1"]),
        (
            "preprocess",
            ["splits=[train]", "data.root=r", "data.cache_dir=c", "data.preprocess_workers=4", "data.shard_size=64"],
        ),
        ("runs", ["root=r", "sort=best", "plot=p.png", "runs_root=elsewhere", "seed=3"]),
        ("demo", ["demo.model=small", "demo.tune_epochs=2", "run_dir=/tmp/demo", "runs_root=/tmp"]),
    ],
)
def test_good_values_pass_the_checks(stage, overrides):
    config.compose(stage, overrides)


def test_numbers_where_strings_are_expected_become_strings():
    cfg = config.compose("eval", ["precision=32", "split=2024"])
    assert cfg.precision == "32" and cfg.split == "2024"


def test_every_model_size_shipped_fits(tmp_path):
    from forecast_peft.models.config import ModelConfig

    for name in ("forecast_mae", "small", "tiny"):
        ModelConfig.from_dict(dict(config.compose("tune", [f"model={name}"]).model)).check()
    ModelConfig().check()


def test_lightning_rejections_of_trainer_values_are_one_line():
    from forecast_peft.errors import ConfigError

    with pytest.raises(ConfigError, match="bad trainer configuration: .*devices") as err:
        config.compose("pretrain", ["trainer.devices=abc", "trainer.accelerator=cpu"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("stage", ["pretrain", "tune"])
def test_a_trainer_value_lightning_refuses_fails_before_the_cache_and_the_run_directory(
    stage, synth_root, tmp_path, capsys
):
    """Lightning checks its arguments together when a Trainer is made: a value it refuses (here
    num_nodes=0; on a machine without a GPU, accelerator=gpu) failed only after the cache was
    brought up to date and the run directory was made, which then held a lone config.yaml."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns("cache"))
    run = tmp_path / "run"
    code = main([stage, *TINY, f"data.root={root}", f"run_dir={run}", "trainer.num_nodes=0"])
    assert code == 2
    assert "bad trainer configuration: `num_nodes` must be a positive integer" in capsys.readouterr().err
    assert not run.exists() and not (root / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
def test_a_gpu_asked_for_where_torch_has_none_says_so(capsys):
    assert main(["tune", "--print-config", "trainer.accelerator=gpu"]) == 2
    err = capsys.readouterr().err
    assert "trainer.accelerator=gpu, but torch finds no CUDA device on this machine" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, env, checked",
    [
        ([], {}, False),  # the defaults, no launcher: printed without Lightning (4.6 s before, 0.46 now)
        (["seed=3", "model.peft.adapter_rank=16"], {}, False),
        (["trainer.max_epochs=3"], {}, True),
        (["+trainer.benchmark=true"], {}, True),
        (["trainer=default"], {}, True),
        ([], {"SLURM_NTASKS": "2"}, True),  # srun's processes must match the Trainer's
        ([], {"TORCHELASTIC_RUN_ID": "x"}, True),
    ],
)
def test_print_config_checks_the_trainer_where_it_may_fail(args, env, checked, monkeypatch):
    from forecast_peft import config_checks

    for name in config_checks.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(config_checks, "_check_trainer", calls.append)
    assert main(["tune", "--print-config", *args]) == 0
    assert bool(calls) == checked
    calls.clear()
    config.compose("tune", args)  # a run checks its Trainer whatever it was given
    assert len(calls) == 1


def test_print_config_of_the_defaults_imports_neither_lightning_nor_torch():
    """A fresh ``fpeft tune --print-config`` (what a user types to see the settings) leaves
    Lightning and torch unimported: their imports were 4.1 of the command's 4.6 s."""
    import subprocess
    import sys

    from forecast_peft.config_checks import LAUNCHER_VARIABLES

    code = (
        "import sys\nfrom forecast_peft.cli import main\nassert main(['tune', '--print-config']) == 0\n"
        "print('imported:', sorted({'pytorch_lightning', 'torch'} & set(sys.modules)))"
    )
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "imported: []"


def test_trainer_output_drops_lightning_adverts_and_noise(tmp_path, caplog):
    import logging

    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    from forecast_peft.training import make_trainer

    caplog.set_level(logging.INFO)
    make_trainer(config.compose("pretrain", ["trainer.accelerator=cpu"]), tmp_path, "val/loss")
    # what Lightning says as a fit counts its steps for the learning-rate schedule, by its own way
    rank_zero_info("Loading `train_dataloader` to estimate number of stepping batches.")
    messages = [r.getMessage() for r in caplog.records]
    # the check can fail: the other lines of Lightning's Trainer set-up do come through
    assert any(m.startswith("GPU available") for m in messages)
    assert not any("Tip:" in m or "stepping batches" in m for m in messages)


@pytest.mark.parametrize(
    "overrides, said",
    [
        (["trainer.max_epochs=5"], "note: optim.warmup_epochs=10 is not below trainer.max_epochs=5"),  # default warm-up
        (["trainer.max_epochs=5", "optim.warmup_epochs=1"], None),
        (["trainer.max_epochs=1"], None),  # one epoch: nothing to decay over
        (["trainer.precision=bf16-true"], "warning: trainer.precision=bf16-true keeps the weights in bfloat16"),
    ],
)
def test_settings_that_work_against_a_run_are_said_before_it_starts(overrides, said, capsys):
    """A shortened run with the default 10-epoch warm-up raised the learning rate over every step
    and never decayed it, without a word."""
    from forecast_peft.training import warn_of_settings

    warn_of_settings(config.compose("tune", overrides))
    err = capsys.readouterr().err
    assert (said in err) if said else err == ""


@pytest.mark.parametrize(
    "overrides, said",
    [
        (
            ["mode=ft", "model.peft.adapter_rank=16"],
            ["'model.peft.adapter_rank=16' is not used: --mode ft has no adapters"],
        ),
        (["mode=ft", "model.peft.num_prompts=10"], []),  # FT's prompts
        (
            ["mode=baseline", "model.peft.num_prompts=10", "model.peft={num_prompts: 3, adapter_rank: 4}"],
            [
                "'model.peft.num_prompts=10' is not used: --mode baseline has no prompts or adapters",
                "'model.peft={num_prompts: 3, adapter_rank: 4}' is not used: --mode baseline",
            ],
        ),
        (["model.mae.actor_mask_ratio=0.3"], ["'model.mae.actor_mask_ratio=0.3' is not used: tuning masks nothing"]),
        (["model.mae.actor_mask_ratio=0.3", "tpp_epochs=2", "model.peft.adapter_rank=16"], []),  # TPP masks
        (["model.mae_typo=1"], None),  # an unknown key stays an error
    ],
)
def test_tuning_settings_its_network_never_reads_are_said(overrides, said, capsys):
    """``fpeft tune --mode ft model.peft.adapter_rank=16`` trained without adapters and said
    nothing of the rank it was given; model.mae.* without tpp_epochs masked nothing."""
    if said is None:
        with pytest.raises(ConfigError, match="unknown key 'model.mae_typo'"):
            config.compose("tune", overrides)
        return
    config.compose("tune", overrides)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(said)
    for line, expected in zip(lines, said):
        assert line.startswith(f"warning: {expected}")
    config.compose("pretrain", ["model.peft.adapter_rank=16"])  # carried in its checkpoint to tuning
    assert capsys.readouterr().err == ""


PATHS = ["/data/av2", "/tmp/my runs/a  b", "/données/é", "runs/seed=1,tpp_epochs=4", "it's", "2024"]


@pytest.mark.parametrize("path", PATHS)
def test_a_command_it_prints_pastes_back_as_the_same_values(path):
    """The commands fpeft prints (``next: fpeft eval -c RUN data.root=...``, ``--resume RUN``) were
    the paths as they are: a folder with a space split in two in the shell, and a data root with a
    non-ASCII letter or '=' in it was refused by Hydra's grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = shlex.split(config.command_line("eval", "-c", path, overrides={"data.root": path}))
    assert words[:4] == ["fpeft", "eval", "-c", path] and len(words) == 5
    assert OverridesParser.create().parse_override(words[4]).value() == path


def test_the_commands_it_prints_name_a_cache_of_its_own():
    """The next command a run prints (tune's ``fpeft eval``, eval's ``fpeft viz``, a sweep's) named
    the data root alone: after ``data.cache_dir=`` (a read-only root, a faster disk) it would have
    built the whole cache again under the root, or failed on a read-only one."""
    own = config.compose("eval", ["data.root=/data/av2"]).data
    assert config.data_overrides(own) == {"data.root": "/data/av2"}
    elsewhere = config.compose("eval", ["data.root=/data/av2", "data.cache_dir=/scratch/av2 cache"]).data
    assert config.data_overrides(elsewhere) == {"data.root": "/data/av2", "data.cache_dir": "/scratch/av2 cache"}
    words = shlex.split(config.command_line("viz", "-c", "RUN", overrides=config.data_overrides(elsewhere)))
    assert words[-2:] == ["data.root=/data/av2", "data.cache_dir=/scratch/av2 cache"]


def test_the_commands_it_prints_name_the_cities_it_chose():
    """A run tuned and validated on ``data.cities=[miami]``: the eval it prints scores miami alone,
    as a list Hydra reads back, whatever the names hold."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    chosen = config.compose("eval", ["data.root=/data/av2", "data.cities=[miami,palo-alto]"]).data
    assert config.data_overrides(chosen) == {"data.root": "/data/av2", "data.cities": ("miami", "palo-alto")}
    line = config.command_line("eval", "-c", "RUN", overrides=config.data_overrides(chosen))
    assert line == "fpeft eval -c RUN data.root=/data/av2 'data.cities=[miami,palo-alto]'"
    odd = ["san josé", "a,b", "it's"]
    words = shlex.split(config.command_line("eval", overrides={"data.cities": odd}))
    assert OverridesParser.create().parse_override(words[-1]).value() == odd


def test_a_file_system_refusal_names_the_path_first():
    from forecast_peft.errors import os_error_line

    assert os_error_line(PermissionError(13, "Permission denied", "/r/x")) == "/r/x: permission denied"
    moved = OSError(18, "Invalid cross-device link", "/tmp/a", None, "/r/b")
    assert os_error_line(moved, "run it again") == "/tmp/a -> /r/b: invalid cross-device link; run it again"
    assert os_error_line(OSError("a socket closed")) == "a socket closed"  # no file named: Python's words


def test_a_compile_failure_is_one_line_with_torchs_traceback_in_a_file(synth_root, monkeypatch, capsys):
    """torch.compile's own failure (CompileError, a bug of torch's as a rule) prints one line; the
    traceback a bug report needs goes to a file the line names."""
    from forecast_peft import stages
    from forecast_peft.errors import CompileError

    def fail(cfg):
        try:
            raise RuntimeError("Expected size for first two dimensions of batch2 tensor")
        except RuntimeError as err:
            raise CompileError("the network compiled with compile=true failed in torch.compile") from err

    monkeypatch.setattr(stages, "eval", fail)
    assert main(["eval", "-c", "x.ckpt", f"data.root={synth_root}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fpeft: error: the network compiled with compile=true failed")
    path = err.split("(torch's traceback: ")[1].rstrip(")\n")
    text = Path(path).read_text()
    assert "RuntimeError: Expected size for first two dimensions" in text and "in fail" in text
    Path(path).unlink()


def test_tensorboard_without_its_package_is_refused_before_any_work(synth_root, tmp_path, monkeypatch, capsys):
    """tensorboard=true needs the tensorboard (or tensorboardX) package, which fpeft does not
    install: one line that says what to install, before the run directory exists."""
    import importlib.util

    real, missing = importlib.util.find_spec, ("tensorboard", "tensorboardX")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, f"data.root={synth_root}", "tensorboard=true", f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "tensorboard=true writes TensorBoard's logs, and neither the tensorboard nor the tensorboardX" in err
    assert "pip install tensorboard" in err and not run.exists()


def test_a_data_root_that_is_missing_or_a_file_is_said_so_in_a_line(tmp_path, capsys):
    """preprocess names what is wrong with data.root, and no split's or AV2's error comes after."""
    file = tmp_path / "scenario.parquet"
    file.write_bytes(b"")
    for root, said in ((tmp_path / "none", "does not exist"), (file, "is a file, not a folder")):
        assert main(["preprocess", f"data.root={root}"]) == 1
        err = capsys.readouterr().err
        assert (
            err == f"fpeft: error: data root {root} {said}: point data.root at an AV2 download or run `fpeft synth`\n"
        )


def test_a_device_this_machine_lacks_or_a_bad_device_name_fails_in_one_line():
    """eval, predict, viz and deploy's ``device``: torch's own errors were tracebacks ("Invalid
    device string", or "Torch not compiled with CUDA enabled" once the network was loaded)."""
    from forecast_peft.stages import _device

    assert _device("cpu") == torch.device("cpu")
    assert _device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"^device must be auto, cpu, cuda or cuda:N, got 'gpu0'$"):
        _device("gpu0")
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device=cuda:64, but torch finds \d+ CUDA devices? here$"):
            _device("cuda:64")
    else:
        for name in ("cuda", "cuda:64"):
            with pytest.raises(ConfigError, match=rf"^device={name}, but this torch \(.*\) finds no cuda device on"):
                _device(name)
