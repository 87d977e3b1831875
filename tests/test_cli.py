import os

import pytest
from typer.testing import CliRunner

from forecast_peft import config
from forecast_peft.cli import app, main

STAGES = ("synth", "preprocess", "pretrain", "tune", "eval", "predict", "viz")
runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.output


@pytest.mark.parametrize("stage", STAGES + ("demo",))
def test_stage_help(stage):
    result = runner.invoke(app, [stage, "--help"])
    assert result.exit_code == 0
    assert "--print-config" in result.output


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
        (["pretrain", "foo=1"], "foo"),
        (["pretrain", "trainer.not_a_trainer_arg=1"], "not_a_trainer_arg"),
        (["pretrain", "a=["], "bad configuration"),
        (["pretrain", "justaword"], "malformed override"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_user_error_from_a_stage_is_one_line(tmp_path, capsys):
    code = main(["preprocess", f"data.root={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert code == 1 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_run_dir_gets_the_composed_config(tmp_path):
    cfg = config.compose("pretrain", [f"run_dir={tmp_path / 'run'}"])
    path = config.make_run_dir(cfg)
    assert (path / "config.yaml").read_text().count("max_epochs") == 1
