"""fpeft called from a user's own Python script: the processes that spawn and forkserver start
import the script again, which runs its code again where it lacks ``if __name__ == "__main__":``.
Such a script is refused in a line that names it, before any process starts."""

import ast
import subprocess
import sys
from types import SimpleNamespace

import pytest

from forecast_peft.runtime import _main_guard, _runs_again

UNGUARDED = """\
import sys
from types import SimpleNamespace

from forecast_peft.data.datamodule import worker_context
from forecast_peft.data.preprocess import preprocess
from forecast_peft.data.synth.generate import generate
from forecast_peft.errors import UserError

out = sys.argv[1]
generate(out, "val", 4, seed=1, style="downtown", progress=False)  # in this process: nothing to refuse
calls = [
    lambda: generate(out, "train", 4, seed=1, style="downtown", progress=False, workers=2),
    lambda: preprocess(out, out + "/cache", ["val"], workers=2, progress=False),
    lambda: worker_context(SimpleNamespace(worker_start="forkserver")),
]
for call in calls:
    try:
        call()
        print("started")
    except UserError as err:
        print(err)
print(worker_context(SimpleNamespace(worker_start="fork")).get_start_method())
"""

GUARDED = """\
import sys
from pathlib import Path

from forecast_peft.data.synth.generate import generate


def main(out):
    generate(out, "train", 4, seed=1, style="downtown", progress=False, workers=2)


if "__main__" == __name__:
    main(sys.argv[1])
    print(len(list(Path(sys.argv[1], "train").iterdir())))
"""


def _run(tmp_path, code: str) -> list[str]:
    script = tmp_path / "user_script.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_a_script_without_the_main_guard_is_refused_before_its_processes_start(tmp_path):
    """Without the refusal, the generator's pool of 2 started processes that failed and started
    them again for ever (17,000 lines of tracebacks in a minute); a training script's DataLoader
    workers ran the script's code again, which then failed on its own run directory."""
    lines = _run(tmp_path, UNGUARDED)
    script = tmp_path / "user_script.py"
    guard = '`if __name__ == "__main__":`'
    assert lines == [
        f"{script}:18: this script runs fpeft outside {guard}, and the scenario generator's processes that fpeft "
        "starts would each run the script again: put its code under that `if`, or generate in one process "
        "(workers=1)",
        f"{script}:18: this script runs fpeft outside {guard}, and the preprocessing processes that fpeft starts "
        "would each run the script again: put its code under that `if`, or preprocess in one process "
        "(data.preprocess_workers=1)",
        f"{script}:18: this script runs fpeft outside {guard}, and the DataLoader workers (forkserver) that fpeft "
        "starts would each run the script again: put its code under that `if`, or set data.worker_start=fork",
        "fork",  # forked workers do not import the script
    ]
    assert not (tmp_path / "data" / "train").exists()  # refused before any work
    assert not list((tmp_path / "data" / "cache" / "val").iterdir())  # nothing cached


def test_a_script_with_the_main_guard_starts_its_processes(tmp_path):
    assert _run(tmp_path, GUARDED) == ["4"]


@pytest.mark.parametrize(
    "main,again",
    [
        (SimpleNamespace(__spec__=SimpleNamespace(name="forecast_peft.__main__"), __file__="x/__main__.py"), False),
        (SimpleNamespace(__spec__=SimpleNamespace(name="tools.train"), __file__="tools/train.py"), True),
        (SimpleNamespace(__spec__=None, __file__="/home/u/train.py"), True),  # python train.py
        (SimpleNamespace(__spec__=None, __file__="/usr/bin/ipython"), False),
        (SimpleNamespace(__spec__=None), False),  # python -c, an interactive session
    ],
)
def test_the_main_module_runs_again_where_multiprocessing_runs_it_again(main, again):
    assert _runs_again(main) is again


@pytest.mark.parametrize(
    "test,guard",
    [
        ('__name__ == "__main__"', True),
        ("'__main__' == __name__", True),
        ('__name__ != "__main__"', False),
        ('__name__ == "__mp_main__"', False),
        ('name == "__main__"', False),
        ("__name__", False),
    ],
)
def test_the_main_guard_is_recognised_either_way_round(test, guard):
    assert _main_guard(ast.parse(f"if {test}:\n    pass\n").body[0]) is guard


@pytest.mark.parametrize("stage", ["pretrain", "eval"])
def test_a_stage_that_would_start_workers_checks_the_script_before_any_work(stage, synth_root, tmp_path, monkeypatch):
    """The stages start their workers' fork server first (``start_worker_server``: its imports
    run while the stage loads its network), so an unguarded script fails before a run directory
    or an evaluation's folder is made, not once the first loader starts."""
    from forecast_peft import config, stages
    from forecast_peft.errors import UserError
    from tests.conftest import TINY

    def refuse(processes, instead):
        raise UserError(f"refused: {processes}")

    monkeypatch.setattr("forecast_peft.data.datamodule.refuse_unguarded_script", refuse)
    out = tmp_path / "out"
    if stage == "pretrain":
        overrides = [*TINY, f"run_dir={out}", "trainer.max_epochs=1"]
    else:
        overrides = ["baselines=[constant_velocity]", f"out={out}"]
    cfg = config.compose(stage, [*overrides, f"data.root={synth_root}", "data.num_workers=1"])
    with pytest.raises(UserError, match=r"refused: DataLoader workers \(forkserver\)"):
        getattr(stages, stage)(cfg)
    assert not out.exists()
