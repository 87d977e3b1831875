"""`fpeft deploy`'s checks of an exported program against the network it came from, in float32
and in bf16 (the whole stage, on a tuned checkpoint: tests/test_pipeline.py)."""

from pathlib import Path

import pytest
import torch

from forecast_peft.constants import FUTURE_STEPS
from forecast_peft.deploy import (
    BF16_ROUNDINGS,
    CHECK_SIZES,
    HISTORY_ONLY,
    INPUT_NAMES,
    MAX_DIFF_M,
    DeployedForecaster,
    ProgramNetwork,
    _by_mode,
    _compare,
    _refuse_unfaithful,
    example_inputs,
    export,
)
from forecast_peft.errors import UserError
from forecast_peft.evaluation import inference_network
from forecast_peft.lit.modules import ForecastModule
from forecast_peft.models.layers import traced_forms
from tests.test_models import tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return inference_network(ForecastModule(tiny().to_dict(), "peft", {}).model).eval()


@pytest.fixture(scope="module")
def bf16_program(network) -> tuple:
    """``network`` exported in bf16 (once: seconds), with its checks."""
    return export(network, CPU, "bf16")


class Shifted(torch.nn.Module):
    """``program``'s forecasts (a network's in the forms programs are traced in) moved by
    ``metres``: an export gone wrong."""

    def __init__(self, program, metres: float):
        super().__init__()
        self.program, self.metres = program, metres

    def forward(self, *inputs):
        with traced_forms():
            xy, p, modes = self.program(*inputs)
        return xy + self.metres, p, modes


def largest_diff(a: tuple, b: tuple) -> float:
    """The largest difference of two programs' forecasts, mode by mode."""
    return float((_by_mode(a[0], a[2]) - _by_mode(b[0], b[2])).abs().max())


def test_a_bf16_program_computes_what_its_network_does_under_autocast(network, bf16_program):
    """A bf16 program computes what the network does under bfloat16 autocast in the forms it was
    traced in (windowed attention, the tapped FPN), which in bfloat16 round otherwise than the
    eager forms: its checks take those. Its forecasts are float32, and bfloat16's rounding away
    from float32's (``bf16_rounding_m``) shows that autocast runs inside it."""
    program, checks = bf16_program
    assert len(checks) == len(CHECK_SIZES)
    assert all(c["max_diff_m"] <= MAX_DIFF_M and 1e-4 < c["bf16_rounding_m"] < 0.5 for c in checks), checks
    inputs = example_inputs(4, 23, 60, CPU, seed=9)
    bf16, float32 = DeployedForecaster(network, "bf16").eval(), DeployedForecaster(network).eval()
    with torch.no_grad():
        got, eager, float32 = program.module()(*inputs), bf16(*inputs), float32(*inputs)
        with traced_forms():
            traced = bf16(*inputs)
    assert got[0].dtype == got[1].dtype == torch.float32  # float32 out either way
    assert largest_diff(got, traced) < 1e-5
    assert largest_diff(eager, traced) > 1e-4  # the forms' own rounding in bfloat16
    assert largest_diff(got, float32) > 1e-4


def test_a_program_off_by_more_than_allowed_is_refused_in_one_line(network):
    model = DeployedForecaster(network).eval()
    _refuse_unfaithful(_compare(model, Shifted(model, MAX_DIFF_M / 2), CPU), "the exported program")
    with pytest.raises(UserError) as err:
        _refuse_unfaithful(_compare(model, Shifted(model, 0.5), CPU), "the exported program")
    assert str(err.value) == (
        "the exported program differs from the network by 0.5 m on 5 scene(s) of 64 agents and 200 lanes (at most "
        f"0.001 m allowed): not written; this torch ({torch.__version__}) may not export it faithfully"
    )
    # an AOTInductor package of a bf16 program: allowed a few times bfloat16's own rounding too
    bf16 = DeployedForecaster(network, "bf16").eval()
    rounding = [c["bf16_rounding_m"] for c in _compare(bf16, Shifted(bf16, 0.0), CPU, float32=model)]
    within = _compare(bf16, Shifted(bf16, min(rounding)), CPU, float32=model)
    with pytest.raises(UserError):  # a program gets no such allowance
        _refuse_unfaithful(within, "the exported program")
    _refuse_unfaithful(within, "the AOTInductor package", BF16_ROUNDINGS)
    off = MAX_DIFF_M + (BF16_ROUNDINGS + 1) * max(rounding)
    with pytest.raises(UserError) as err:
        _refuse_unfaithful(_compare(bf16, Shifted(bf16, off), CPU, float32=model), "the AOTInductor package", 3)
    assert str(err.value).startswith(f"the AOTInductor package differs from the network by {off:.3g} m on 5 scene")
    assert f"allowed: 0.001 m plus 3 times bfloat16's own rounding there, {rounding[0]:.3g} m): not" in str(err.value)


def test_a_bf16_program_scored_at_precision_bf16_runs_in_its_own_precision(bf16_program):
    """eval's `--precision bf16` autocast around a bf16 program changes nothing: the program runs
    as it was exported, and the change back to the focal frame in float32 (under autocast its
    rotation would round to bfloat16: about 1 cm in 20 m)."""
    program, _ = bf16_program
    inputs = dict(zip(INPUT_NAMES, example_inputs(4, 20, 50, CPU, seed=3)))
    for name in HISTORY_ONLY:  # a batch's are 110 steps long
        inputs[name] = torch.cat([inputs[name], inputs[name][..., -1:].expand(-1, -1, FUTURE_STEPS)], -1)
    inputs["origin"] = inputs["origin"] + 2500.0  # world coordinates as AV2's
    scored = ProgramNetwork(program.module())
    with torch.no_grad():
        want = scored(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = scored(inputs)
    assert torch.equal(got["y_hat"], want["y_hat"]) and torch.equal(got["pi"], want["pi"])
    assert got["y_hat"].dtype == torch.float32


def test_eval_s_copy_of_a_program_is_the_program_without_a_warning(bf16_program):
    """``inference_network`` copies the network it scores; a deployed program's copy (torch's deep
    copy printed a FutureWarning on every `fpeft eval -c model.pt2`) is the same program."""
    import warnings

    program, _ = bf16_program
    scored = ProgramNetwork(program.module())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copied = inference_network(scored)
    assert copied is not scored and copied.program is scored.program and not copied.training


def test_the_cpp_runner_without_a_compiler_fails_in_one_line(monkeypatch, tmp_path, capsys):
    """`python -m forecast_peft.cpp OUT` (the C++ runner; compiled and run in the slow test of
    AOTInductor packages, tests/test_pipeline.py)."""
    from forecast_peft.cpp.__main__ import main as build_main

    monkeypatch.setenv("CXX", "no-such-compiler")
    assert build_main([str(tmp_path / "forecast")]) == 1
    assert capsys.readouterr().err == (
        "forecast_peft.cpp: error: no C++ compiler 'no-such-compiler' on PATH: install g++ (or clang++ and set "
        "CXX=clang++)\n"
    )
    assert not (tmp_path / "forecast").exists()


def test_a_program_torch_cannot_write_is_one_line_and_leaves_no_part_file(bf16_program, tmp_path, monkeypatch):
    """torch.export.save's writer fails with a RuntimeError (``[enforce fail at
    inline_container.cc...] open file failed``, or a write cut short): one line naming the file,
    and no half-written ``.part.pt2`` left behind."""
    from forecast_peft.deploy import save

    def failing(program, path, extra_files):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:747] . PytorchStreamWriter failed writing file\nmore")

    monkeypatch.setattr(torch.export, "save", failing)
    with pytest.raises(UserError) as caught:
        save(bf16_program[0], tmp_path / "m.pt2", {"mode": "peft"})
    assert str(caught.value) == (
        f"{tmp_path / 'm.pt2'}: cannot write it ([enforce fail at inline_container.cc:747] . PytorchStreamWriter "
        "failed writing file)"
    )
    assert list(tmp_path.iterdir()) == []


def test_what_is_not_a_program_says_what_it_is_in_one_line(bf16_program, tmp_path):
    """-c takes a `fpeft deploy` program by its .pt2 name. The AOTInductor package written beside
    it (torch's words for it: "check the warnings above", of which there were none) and the program
    under a checkpoint's name each say what they are and what to give instead."""
    import shutil
    import zipfile

    from forecast_peft.checkpoints import load_checkpoint
    from forecast_peft.deploy import load, save

    model = tmp_path / "m.pt2"
    save(bf16_program[0], model, {"mode": "peft"})
    assert load(model)[1] == {"mode": "peft"}
    package = tmp_path / "m.aoti.pt2"  # the layout `fpeft deploy aoti=true` writes, less the compiled code
    with zipfile.ZipFile(package, "w") as archive:
        for name, text in (("archive_format", "pt2"), ("archive_version", "0"), ("data/aotinductor/model/a.cpp", "")):
            archive.writestr(f"m.aoti/{name}", text)
    with pytest.raises(UserError) as caught:
        load(package)
    assert str(caught.value) == (
        f"{package} is an AOTInductor package, which C++ or torch._inductor.aoti_load_package runs: eval, predict "
        "and viz take the program `fpeft deploy` wrote beside it (m.pt2)"
    )
    shutil.copy(model, tmp_path / "m.ckpt")
    with pytest.raises(UserError) as caught:
        load_checkpoint(tmp_path / "m.ckpt")
    assert str(caught.value) == (
        f"{tmp_path / 'm.ckpt'}: not a readable checkpoint (torch's .pt2 archive, which `fpeft deploy` writes: -c "
        "takes a program by its .pt2 name)"
    )
