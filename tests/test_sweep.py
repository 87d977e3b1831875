"""`fpeft pretrain|tune --multirun`: sweeps over override values, and `eval -c SWEEP_FOLDER`."""

import json
import shutil

import pandas as pd
import pytest

from forecast_peft import stages
from forecast_peft.cli import main
from forecast_peft.errors import StorageError, Terminated, UserError
from forecast_peft.sweep import expand, run_name, swept_values
from tests.conftest import TINY


def test_expand_gives_every_combination_in_order():
    fixed, runs = expand(["data.root=x", "seed=1,2", "tpp_epochs=range(0,5,4)", "model.peft.adapter_rank=choice(8)"])
    assert fixed == ["data.root=x"]
    assert runs == [
        ["seed=1", "tpp_epochs=0", "model.peft.adapter_rank=8"],
        ["seed=1", "tpp_epochs=4", "model.peft.adapter_rank=8"],
        ["seed=2", "tpp_epochs=0", "model.peft.adapter_rank=8"],
        ["seed=2", "tpp_epochs=4", "model.peft.adapter_rank=8"],
    ]
    assert expand(["pretrained='a/b c.ckpt','d.ckpt'"])[1] == [["pretrained='a/b c.ckpt'"], ["pretrained='d.ckpt'"]]
    assert run_name(["pretrained='a/b c.ckpt'", "seed=1"]) == "pretrained=a_b_c.ckpt,seed=1"
    # a list's commas would read as the next override's: its values are joined by +
    assert run_name(["data.cities=[austin,palo-alto]", "seed=1"]) == "data.cities=austin+palo-alto,seed=1"
    assert swept_values(run_name(["data.cities=[miami]", "seed=1"])) == {"data.cities": "miami", "seed": "1"}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["seed=1"], "--multirun needs an override with several values"),
        (["seed=interval(1,2)"], "sweeps lists of values"),
        (["seed=1,2", "run_dir=a,b"], "run_dir, the sweep's folder, takes one value"),
        (["seed=1,2", "resume=x"], "--multirun resumes the interrupted runs of its folder"),
        (["seed=1,2", "auto_resume=true"], "goes on with the runs there by itself when run again"),
        (["seed=1,2", "optim.lr=[1"], "bad override: no viable alternative at input '[1'"),
        (["pretrained=runs/seed=1,runs/seed=2"], "quote the value: \"pretrained='runs/seed=1','runs/seed=2'\""),
        (["data.cache_dir=a/b,a_b"], "two runs of the sweep would share a directory name"),
    ],
)
def test_bad_sweeps_fail_in_one_line_before_any_run(overrides, needle, synth_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stages, "tune", lambda cfg: pytest.fail("no run may start"))
    assert main(["tune", "-m", f"data.root={synth_root}", f"run_dir={tmp_path}", *overrides]) != 0
    assert needle in capsys.readouterr().err


def test_every_run_is_composed_before_the_first_starts(synth_root, capsys, monkeypatch):
    monkeypatch.setattr(stages, "tune", lambda cfg: pytest.fail("no run may start"))
    assert main(["tune", "-m", f"data.root={synth_root}", "seed=1,2", "optim.lr=0"]) == 2
    assert "fpeft: error: sweep run seed=1: optim.lr must be > 0" in capsys.readouterr().err
    assert main(["tune", "-m", f"data.root={synth_root}", "optim.lr=1e-3,0"]) == 2
    assert "fpeft: error: sweep run optim.lr=0: optim.lr must be > 0" in capsys.readouterr().err


def test_a_sweep_runs_each_combination_and_keeps_what_it_finds(synth_root, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "sweep"
    args = ["tune", "--mode", "ft", "-m", *TINY, f"data.root={synth_root}", "trainer.max_epochs=1", f"run_dir={folder}"]
    assert main([*args, "seed=1,2"]) == 0
    out = capsys.readouterr().out
    assert f"sweep: 2 runs of `fpeft tune` in {folder}" in out and f"[2/2] seed=2: {folder / 'seed=2'}" in out
    for seed in (1, 2):
        saved = (folder / f"seed={seed}" / "config.yaml").read_text()
        assert f"seed: {seed}\n" in saved and (folder / f"seed={seed}" / "checkpoints" / "last.ckpt").is_file()
        assert "auto_resume: true\n" in saved  # the same command goes on with it: a requeued job requeues
    assert f"| {folder / 'seed=1'} | tune ft | tiny |" in out and f"| {folder / 'seed=2'} | tune ft | tiny |" in out
    assert f"next: fpeft eval -c {folder} data.root={synth_root}" in out
    assert f"learning curves: {folder / 'learning_curves.png'}" in out
    assert (folder / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"

    # the same sweep again with more values: finished runs kept, an interrupted one resumed, the new ones
    # started; a failing run does not stop the others
    (folder / "seed=2" / "finished.json").unlink()  # as a run stopped after its first epoch leaves it
    ran = []
    real = stages.tune

    def tune(cfg):
        ran.append((cfg.seed, cfg.resume))
        if cfg.seed == 3:
            raise UserError("no such thing")
        return real(cfg)

    monkeypatch.setattr(stages, "tune", tune)
    assert main([*args, "seed=1,2,3,4"]) == 1
    captured = capsys.readouterr()
    assert ran == [(2, str(folder / "seed=2")), (3, None), (4, None)]
    assert f"[1/4] seed=1: kept, {folder / 'seed=1'} holds a finished run" in captured.out
    assert f"resuming from {folder / 'seed=2' / 'checkpoints' / 'last.ckpt'}" in captured.out
    assert "[3/4] seed=3: failed: no such thing" in captured.out and "failed: seed=3: no such thing" in captured.out
    assert "1 run of the sweep's 4 failed" in captured.err
    epochs = {seed: pd.read_csv(folder / f"seed={seed}" / "logs" / "metrics.csv")["epoch"].max() for seed in (1, 2, 4)}
    assert epochs == {1: 0, 2: 0, 4: 0}  # the resumed run had its one epoch: it ends at once, finished
    assert all((folder / f"seed={seed}" / "finished.json").is_file() for seed in (1, 2, 4))

    # a stage that takes one run says what the folder holds
    assert main(["predict", "-c", str(folder), f"data.root={synth_root}"]) == 1
    err = capsys.readouterr().err
    assert f"{folder} is a folder of 3 runs (seed=1, seed=2, seed=4), not a run: give one of them" in err

    # eval -c FOLDER: each run of the sweep, named by its values
    report = tmp_path / "report"
    data = [f"data.root={synth_root}", "data.num_workers=0"]
    assert main(["eval", "-c", str(folder), *data, "--out", str(report)]) == 0
    assert f"-c {folder}: 3 tuning runs (seed=1, seed=2, seed=4)" in capsys.readouterr().out
    rows = json.loads((report / "report.json").read_text())
    assert [row["name"] for row in rows][-3:] == ["ft (seed=1)", "ft (seed=2)", "ft (seed=4)"]
    assert [row["values"] for row in rows[-3:]] == [{"seed": "1"}, {"seed": "2"}, {"seed": "4"}]
    assert rows[-1]["checkpoint"] == str(folder / "seed=4") and "checkpoint" not in rows[0]  # a baseline
    (folder / "seed=5").mkdir()  # a run stopped before its first epoch ended: named, not dropped in silence
    shutil.copy(folder / "seed=4" / "config.yaml", folder / "seed=5" / "config.yaml")
    assert main(["eval", "-c", str(folder), *data, "--out", str(report)]) == 0
    out = capsys.readouterr().out
    listed = f"-c {folder}: 3 tuning runs (seed=1, seed=2, seed=4)\n"
    assert listed + f"-c {folder}: not scored, no tuning checkpoint yet: seed=5\n" in out


def test_print_config_lists_the_runs(synth_root, capsys):
    assert main(["tune", "-m", "--print-config", f"data.root={synth_root}", "seed=1,2", "tpp_epochs=0,1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("seed=1,tpp_epochs=0: ") and lines[0].endswith(" seed=1 tpp_epochs=0")
    assert len(lines) == 4
    # a setting that one run's network never reads: said for that run alone, by its name
    args = ["tune", "-m", "--print-config", f"data.root={synth_root}", "mode=peft,ft", "model.peft.adapter_rank=16"]
    assert main(args) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: sweep run mode=ft: 'model.peft.adapter_rank=16' is not used: --mode ft has no adapters (its "
        "prompts are model.peft.num_prompts)"
    ]


def test_a_stopped_sweep_says_the_same_command_goes_on(synth_root, tmp_path, capsys, monkeypatch):
    def tune(cfg):
        if cfg.seed == 2:
            raise Terminated("terminated (SIGTERM): ...")
        return {}

    monkeypatch.setattr(stages, "tune", tune)
    assert main(["tune", "-m", f"data.root={synth_root}", f"run_dir={tmp_path}", "seed=1,2,3"]) == 143
    err = capsys.readouterr().err
    assert "sweep stopped at run 2 of 3: the same command goes on with it" in err
    assert err.endswith("fpeft: terminated (SIGTERM): ...\n")


def test_a_full_disk_stops_a_sweep(synth_root, tmp_path, capsys, monkeypatch):
    """A run that meets a full disk stops the sweep, as a SIGTERM does: the runs after it would
    meet the same disk. Other failures of a run (UserError) let the sweep go on."""
    calls = []

    def tune(cfg):
        calls.append(cfg.seed)
        if cfg.seed == 2:
            raise StorageError("no space left on the device writing x/last.ckpt: ...")
        return {}

    monkeypatch.setattr(stages, "tune", tune)
    assert main(["tune", "-m", f"data.root={synth_root}", f"run_dir={tmp_path}", "seed=1,2,3"]) == 1
    err = capsys.readouterr().err
    assert calls == [1, 2]
    assert "sweep stopped at run 2 of 3: the same command goes on with it" in err
    assert err.endswith("fpeft: error: no space left on the device writing x/last.ckpt: ...\n")


def test_a_sweep_across_processes_needs_one_folder(synth_root, tmp_path, capsys, monkeypatch):
    """Under torchrun or srun every process starts the sweep itself: a time-stamped folder would
    differ between them, so the runs each keeps or resumes could differ too."""
    monkeypatch.setattr(stages, "tune", lambda cfg: {})
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["tune", "-m", f"data.root={synth_root}", "seed=1,2"]
    assert main(args) == 2
    assert "a sweep across 2 processes needs run_dir=FOLDER, the same in every one" in capsys.readouterr().err
    assert main([*args, f"run_dir={tmp_path}"]) == 0


def test_a_finished_run_trains_on_for_more_epochs_and_is_kept_otherwise(synth_root, tmp_path, capsys, monkeypatch):
    from omegaconf import OmegaConf

    from forecast_peft import config

    for seed in (1, 2):  # two finished runs of `tune -m seed=1,2 trainer.max_epochs=1`, as the sweep leaves them
        cfg = config.compose("tune", [f"data.root={synth_root}", f"seed={seed}", "trainer.max_epochs=1"])
        cfg.run_dir = str(tmp_path / f"seed={seed}")
        (tmp_path / f"seed={seed}" / "checkpoints").mkdir(parents=True)
        (tmp_path / f"seed={seed}" / "checkpoints" / "last.ckpt").touch()
        (tmp_path / f"seed={seed}" / "finished.json").write_text("{}")
        OmegaConf.save(cfg, tmp_path / f"seed={seed}" / "config.yaml")
    ran = []
    monkeypatch.setattr(stages, "tune", lambda cfg: ran.append((cfg.seed, cfg.resume)) or {})
    args = ["tune", "-m", f"data.root={synth_root}", "seed=1,2", f"run_dir={tmp_path}"]
    assert main([*args, "trainer.max_epochs=1"]) == 0 and ran == []  # the same: kept
    assert main([*args, "trainer.max_epochs=3"]) == 0  # more epochs: each trains on from its last checkpoint
    assert ran == [(1, str(tmp_path / "seed=1")), (2, str(tmp_path / "seed=2"))]
    capsys.readouterr()
    assert main([*args, "trainer.max_epochs=1", "optim.lr=0.01"]) == 0 and len(ran) == 2  # other values: kept, said
    out = capsys.readouterr().out
    assert "[1/2] seed=1: kept, " in out and "made with other values (optim.lr 0.001 there, 0.01 here)" in out


def test_compiled_runs_of_another_network_start_from_an_empty_cache(synth_root, tmp_path, monkeypatch):
    """torch.compile keeps 8 graphs per function, then runs eagerly: a sweep over model sizes with
    compile=true clears its cache between networks, and keeps it for runs of one network."""
    import torch

    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    monkeypatch.setattr(stages, "tune", lambda cfg: {})
    args = ["tune", "-m", f"data.root={synth_root}", "compile=true"]
    assert main([*args, "seed=1,2,3", f"run_dir={tmp_path / 'a'}"]) == 0 and resets == []
    assert main([*args, "model.peft.adapter_rank=4,8", "seed=1,2", f"run_dir={tmp_path / 'b'}"]) == 0
    assert len(resets) == 1  # (rank, seed): (4, 1), (4, 2), (8, 1) a new network, (8, 2)
    assert main([*args, "seed=1,2", "model.peft.adapter_rank=4,8", f"run_dir={tmp_path / 'c'}"]) == 0
    assert len(resets) == 1 + 3  # (seed, rank): (1, 4), (1, 8), (2, 4), (2, 8): each a new network
    assert main(["tune", "-m", f"data.root={synth_root}", "model.peft.adapter_rank=4,8", f"run_dir={tmp_path}/d"]) == 0
    assert len(resets) == 4  # not compiled: nothing to clear
    assert main([*args, "compile_mode=default,max-autotune-no-cudagraphs", f"run_dir={tmp_path / 'e'}"]) == 0
    assert len(resets) == 5  # another compile mode: another network
