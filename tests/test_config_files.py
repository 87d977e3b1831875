"""``--config FILE``: a stage's settings from YAML files, under the command line's overrides."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from forecast_peft import config
from forecast_peft.cli import app, main
from forecast_peft.config_files import file_overrides
from forecast_peft.errors import ConfigError
from tests.conftest import ROOT, TINY


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def test_a_run_s_saved_configuration_composes_the_same_run_in_a_directory_of_its_own(tmp_path):
    """A run's config.yaml (every setting, resolved; trainer arguments added with +; lists) given
    as --config composes the same configuration, less its run directory: the new run gets its own."""
    run = tmp_path / "runs" / "a"
    given = [*TINY, "data.root=/data/av2", "+trainer.benchmark=true", "optim.lr=2e-3", "mode=ft", "seed=7"]
    given += [f"run_dir={run}", "model.agent.widths=[8,16,32]"]
    original = config.compose("tune", given)
    saved = _write(run / "config.yaml", config.to_yaml(original))
    overrides = file_overrides("tune", [saved], [])
    assert not any(item.startswith(("run_dir=", "stage=", "resume=", "auto_resume=")) for item in overrides)
    again = config.compose("tune", overrides)
    assert Path(again.run_dir).parent == Path("data/runs/tune") and again.run_dir != original.run_dir
    want, got = _plain(original), _plain(again)
    want.pop("run_dir"), got.pop("run_dir")
    assert got == want
    # the command line wins: its own run directory, another data root (which the cache follows)
    overrides = file_overrides("tune", [saved], ["data.root=/other", "optim.lr=1e-4"])
    mixed = config.compose("tune", overrides + ["data.root=/other", "optim.lr=1e-4"])
    assert (mixed.data.root, mixed.data.cache_dir, mixed.optim.lr) == ("/other", "/other/cache", 1e-4)
    assert (mixed.mode, mixed.seed, mixed.trainer.benchmark) == ("ft", 7, True)


def test_files_nest_or_dot_their_keys_name_groups_and_come_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    first = _write(
        tmp_path / "cluster.yaml",
        "data:\n  root: ~/av2\n  num_workers: 8\ntrainer.max_epochs: 3\nmodel: tiny\noptim: {lr: 2.0e-3}\n",
    )
    second = _write(tmp_path / "mine.yaml", "data.num_workers: 4\nprecision: 32-true\n")
    cfg = config.compose("tune", file_overrides("tune", [first], []))
    assert cfg.data.root == str(tmp_path / "home" / "av2") and cfg.data.num_workers == 8
    assert (cfg.trainer.max_epochs, cfg.model.embed_dim, cfg.optim.lr) == (3, 32, 2e-3)
    with pytest.raises(ConfigError, match="unknown key 'precision' for `fpeft tune`"):
        file_overrides("tune", [first, second], [])
    _write(second, "data.num_workers: 4\ntrainer.precision: 32-true\n")
    cfg = config.compose("tune", file_overrides("tune", [first, second], []))
    assert cfg.data.num_workers == 4 and cfg.trainer.precision == "32-true"  # the later file wins, a string kept


@pytest.mark.parametrize(
    "value",
    ["it's here", 'a "b" c', 'it\'s a "dir"', "/données/é", "32", "a,b", "${runs_root}/x", "true", "x=y (z)"],
)
def test_a_string_value_arrives_as_the_same_string(value, tmp_path):
    """Each value is written in Hydra's override grammar and read back by its parser before use:
    a string stays that string (quotes, commas, '=', a number or a boolean in quotes)."""
    path = _write(tmp_path / "s.yaml", "")
    OmegaConf.save(OmegaConf.create({"data": {"root": value}}), path)
    overrides = file_overrides("eval", [path], [])
    cfg = config.compose("eval", overrides)
    want = "data/runs/x" if value == "${runs_root}/x" else value  # an interpolation resolves, as typed
    assert cfg.data.root == want


def test_a_group_file_named_on_the_command_line_replaces_the_files_values_in_it(tmp_path):
    """``--config tiny_run/config.yaml model=small``: the command line picked the model, so the
    file's model values (a tiny run's) give way; a file's own ``model: tiny`` with a size beside it
    keeps that size, even where it equals the default group's."""
    run = tmp_path / "run"
    _write(run / "config.yaml", config.to_yaml(config.compose("tune", [*TINY, f"run_dir={run}"])))
    small = config.compose("tune", ["model=small"])
    cfg = config.compose("tune", file_overrides("tune", [run / "config.yaml"], ["model=small"]) + ["model=small"])
    assert _plain(cfg.model) == _plain(small.model)
    path = _write(tmp_path / "t.yaml", "model: tiny\nmodel.drop_path: 0.2\nmodel.num_heads: 8\n")
    cfg = config.compose("tune", file_overrides("tune", [path], []))
    assert (cfg.model.drop_path, cfg.model.num_heads, cfg.model.embed_dim) == (0.2, 8, 32)


def test_a_copy_of_a_stage_s_own_config_file_reads_its_defaults_list(tmp_path):
    """conf/tune.yaml copied and edited: its defaults list names the group files (``- model:
    tiny``); the rest of it, the stage's own entries and interpolations, changes nothing."""
    own = (ROOT / "conf" / "tune.yaml").read_text()
    assert file_overrides("tune", [_write(tmp_path / "same.yaml", own)], []) == []
    edited = own.replace("- model: forecast_mae", "- model: tiny").replace("\nmode: peft", "\nmode: ft")
    cfg = config.compose("tune", file_overrides("tune", [_write(tmp_path / "t.yaml", edited)], []))
    assert (cfg.model.embed_dim, cfg.mode) == (32, "ft")


def test_settings_equal_to_the_defaults_change_nothing(tmp_path):
    """A saved configuration holds every setting: those at their defaults are left out, so they
    neither warn (model.mae.* of a run without TPP) nor trip a sweep (resume: null)."""
    path = _write(tmp_path / "d.yaml", "resume: null\nauto_resume: false\nmodel:\n  mae:\n    actor_mask_ratio: 0.5\n")
    assert file_overrides("tune", [path], []) == []
    _write(path, "model:\n  mae:\n    actor_mask_ratio: 0.25\n")
    assert file_overrides("tune", [path], []) == ["model.mae.actor_mask_ratio=0.25"]


@pytest.mark.parametrize(
    "text, stage, error",
    [
        ("stage: tune\nseed: 1\n", "pretrain", "the settings of `fpeft tune` (stage: tune), not of `fpeft pretrain`"),
        ("data:\n  rooot: x\n", "tune", "unknown key 'data.rooot' for `fpeft tune` (did you mean 'data.root'?)"),
        ("optim.lr: 1.0e-3\n", "eval", "unknown key 'optim.lr' for `fpeft eval`"),
        ("demo: {lr: 1.0e-3}\n", "demo", "'demo.lr' is gone: set demo.pretrain_lr (pre-training) and demo.tune_lr"),
        ("trainer:\n  max_epoch: 3\n", "tune", "trainer.max_epoch is not an argument of Lightning's Trainer (did you"),
        ("a: [1, 2\n", "tune", "not readable YAML (ParserError: "),
        ("- 1\n- 2\n", "tune", "not a mapping of settings (key: value lines)"),
        (
            "root: /data\n",
            "tune",
            "unknown key 'root' for `fpeft tune` (did you mean 'data.root'? the settings of a file",
        ),
        ("defaults:\n  - [model, tiny]\n", "tune", "a defaults entry fpeft cannot read: ['model', 'tiny']"),
        (None, "tune", "no such settings file"),
    ],
)
def test_a_bad_file_is_one_line_that_names_it(text, stage, error, tmp_path, capsys):
    path = tmp_path / "f.yaml"
    if text is not None:
        _write(path, text)
    assert main([stage, "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fpeft: error: {path}: {error}") and len(err.strip().splitlines()) == 1, err


def test_the_command_line_takes_config_files(tmp_path, capsys):
    """--config on the command line, repeatable; --print-config shows the outcome; a sweep takes
    the files' settings for every run."""
    first = _write(tmp_path / "a.yaml", "model: tiny\ntrainer: {max_epochs: 3}\nseed: 5\n")
    second = _write(tmp_path / "b.yaml", "seed: 6\n")
    args = ["tune", "--config", str(first), "--config", str(second), "--print-config", "trainer.max_epochs=4"]
    assert main(args) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert (printed.model.embed_dim, printed.trainer.max_epochs, printed.seed) == (32, 4, 6)
    assert main(["tune", "-m", "--config", str(first), "--print-config", "optim.lr=1e-3,2e-3"]) == 0
    runs = capsys.readouterr().out.strip().splitlines()
    assert len(runs) == 2 and all("model='tiny'" in run and "seed=5" in run for run in runs)
    for stage in config.STAGES:  # every stage takes it
        result = CliRunner().invoke(app, [stage, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "--config FILE" in result.output, stage
