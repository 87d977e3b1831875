"""`fpeft deploy`: a tuned network as one file that runs with torch alone (torch.export's ``.pt2``),
for a service or a vehicle's software rather than this toolkit.

The program takes the Forecast-MAE features of a batch of scenes, history only (the present is
step 49 of 50), as the tensors ``INPUTS`` lists in that order, and returns the focal agent's
``K`` modes in world coordinates, the most probable first, with their probabilities and the
network's numbers of them: ``trajectories`` [B, K, 60, 2] (metres), ``probabilities`` [B, K]
(summing to 1) and ``modes`` [B, K]. Batch,
agent and lane counts may differ from call to call (``B``, ``N``, ``L``); the focal agent is
agent 0 of each scene. The adapters are folded into the layers beside them first, as ``fpeft
eval`` does; the program runs on the device it was exported on, in float32 or (``precision``
bf16) under bfloat16 autocast, as ``fpeft eval --precision bf16`` runs the network; its inputs and
outputs are float32 either way. ``aoti`` also compiles it ahead of time (AOTInductor) into a
package C++ loads; that one needs contiguous inputs (``LAYOUT``).
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from forecast_peft.constants import CURRENT_STEP, FUTURE_STEPS, HISTORY_STEPS, LANE_POINTS
from forecast_peft.errors import UserError, first_sentence, reason_of
from forecast_peft.evaluation import probability_scores, to_focal, to_world

# the program's inputs in order: name, shape (B scenes, N agents, L lanes), dtype, meaning
# (FORECAST_MAE.md; forecast_peft.data.features computes them, forecast_peft.data.dataset pads them)
# fmt: off
INPUTS = (
    ("x", ("B", "N", HISTORY_STEPS, 2), "float32", "each step's displacement from the one before, focal frame, "
     "metres (0 where either is unobserved; step 0 is 0)"),
    ("x_attr", ("B", "N", 3), "uint8", "AV2 object type index, object category, combined type (vehicle/bus 0, "
     "pedestrian 1, motorcyclist/cyclist 2, else 3)"),
    ("x_centers", ("B", "N", 2), "float32", "position at the present step (the last), focal frame, metres"),
    ("x_angles", ("B", "N", HISTORY_STEPS), "float32", "heading less the focal agent's present heading, wrapped "
     "to [-pi, pi)"),
    ("x_velocity_diff", ("B", "N", HISTORY_STEPS), "float32", "speed change from the step before, m/s (0 where "
     "either is unobserved)"),
    ("x_padding_mask", ("B", "N", HISTORY_STEPS), "bool", "True where the agent is unobserved or a padding slot"),
    ("lane_positions", ("B", "L", LANE_POINTS, 2), "float32", "centreline points, focal frame, metres (0 where "
     "padded)"),
    ("lane_centers", ("B", "L", 2), "float32", "the mean of centreline points 9 and 10"),
    ("lane_angles", ("B", "L"), "float32", "the direction from centreline point 9 to point 10, focal frame"),
    ("lane_padding_mask", ("B", "L", LANE_POINTS), "bool", "True at points outside the 150 m box around the focal "
     "agent, or padding"),
    ("origin", ("B", 2), "float32", "the focal agent's world position at the present step, metres"),
    ("theta", ("B",), "float32", "the focal agent's world heading at the present step, radians"),
)
INPUT_NAMES = tuple(name for name, *_ in INPUTS)
HISTORY_ONLY = ("x_angles", "x_padding_mask")  # a batch's are 110 steps long, the program's 50
OUTPUTS = (
    ("trajectories", ("B", "K", FUTURE_STEPS, 2), "float32", "world positions 0.1-6 s ahead, most probable mode first"),
    ("probabilities", ("B", "K"), "float32", "of each mode, in the same order; each row sums to 1"),
    ("modes", ("B", "K"), "int64", "the network's number of each mode, in the same order (what `fpeft eval` "
     "reports as top_mode)"),
)
# fmt: on
# measured: AOTInductor's package read a sliced (strided) x_angles as if it were contiguous, 52 m
# off, where the program was right
LAYOUT = (
    "every input a contiguous (row-major) tensor on the program's device; the program also takes strided views, "
    "an AOTInductor package (NAME.aoti.pt2) does not: it reads them wrongly, without an error"
)
SPEC_FILE = "forecast_peft.json"  # the spec inside the .pt2 (torch.export.load's extra_files)
# the exported program against the network it came from, on scenes of sizes other than those
# traced: they differ by float rounding alone (about 1e-5 m); beyond this the export is refused
MAX_DIFF_M = 1e-3
# an AOTInductor package of a bf16 program fuses its operations and keeps their intermediate
# values in float32, so it rounds otherwise than the program: it may differ from the program by
# MAX_DIFF_M plus this many times bfloat16's own rounding on those scenes (the program against the
# network in float32, ``bf16_rounding_m``)
BF16_ROUNDINGS = 3
PRECISION_NAMES = {"32": "float32", "bf16": "bfloat16 autocast"}
CHECK_SIZES = ((5, 64, 200), (1, 1, 1), (2, 9, 150))  # (scenes, agents, lanes) of the checks


class DeployedForecaster(nn.Module):
    """``network`` (a tuned forecaster, adapters folded) as a function of ``INPUTS`` alone."""

    def __init__(self, network: nn.Module, precision: str = "32"):
        super().__init__()
        self.network = network
        self.bf16 = precision == "bf16"

    def forward(  # noqa: PLR0913 - INPUTS, by name: the program's inputs are named after them
        self,
        x: torch.Tensor,
        x_attr: torch.Tensor,
        x_centers: torch.Tensor,
        x_angles: torch.Tensor,
        x_velocity_diff: torch.Tensor,
        x_padding_mask: torch.Tensor,
        lane_positions: torch.Tensor,
        lane_centers: torch.Tensor,
        lane_angles: torch.Tensor,
        lane_padding_mask: torch.Tensor,
        origin: torch.Tensor,
        theta: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = {name: value for name, value in locals().items() if name in INPUT_NAMES}
        b, n, _ = batch["x_angles"].shape
        # the network's arrays span 110 steps; it reads the history alone
        batch["x_angles"] = torch.cat([batch["x_angles"], batch["x_angles"].new_zeros(b, n, FUTURE_STEPS)], -1)
        unseen = batch["x_padding_mask"].new_ones(b, n, FUTURE_STEPS)
        batch["x_padding_mask"] = torch.cat([batch["x_padding_mask"], unseen], -1)
        batch["x_key_padding_mask"] = batch["x_padding_mask"][..., : CURRENT_STEP + 1].all(-1)
        batch["lane_key_padding_mask"] = batch["lane_padding_mask"].all(-1)
        if self.bf16:  # as `fpeft eval --precision bf16` runs it; the output heads stay float32 (head_output)
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                out = self.network(batch)
        else:
            out = self.network(batch)
        probabilities, order = torch.sort(torch.softmax(out["pi"].float(), -1), dim=-1, descending=True, stable=True)
        y_hat = torch.gather(out["y_hat"].float(), 1, order[:, :, None, None].expand(-1, -1, FUTURE_STEPS, 2))
        return to_world(y_hat, batch["origin"], batch["theta"]), probabilities, order


def program_inputs(batch: dict) -> list[torch.Tensor]:
    """A collated batch's features (``forecast_peft.data.dataset``: history and future) as the
    program's ``INPUTS``, in order: its history alone. Views of the batch's tensors: an
    AOTInductor package wants each made contiguous (``LAYOUT``)."""
    return [batch[name][..., :HISTORY_STEPS] if name in HISTORY_ONLY else batch[name] for name in INPUT_NAMES]


def example_inputs(scenes: int, agents: int, lanes: int, device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random ``INPUTS`` of these sizes: features of plausible scale, tracks that start late, lanes
    cut short and padding slots, the focal agent observed throughout."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"B": scenes, "N": agents, "L": lanes}
    out = []
    for name, shape, dtype, _ in INPUTS:
        shape = tuple(sizes.get(d, d) for d in shape)
        if dtype == "bool":
            value = torch.rand(shape, generator=g) < 0.2
            if name == "x_padding_mask":
                value[:, 0] = False
                if agents > 1:
                    value[:, -1] = True  # a padding slot
        elif dtype == "uint8":
            value = torch.randint(0, 4, shape, generator=g, dtype=torch.uint8)
        else:
            scale = {"x": 1.0, "x_velocity_diff": 0.5, "origin": 1000.0}.get(name, 3.14 if "angle" in name else 40.0)
            value = torch.randn(shape, generator=g) * scale
        out.append(value.to(device))
    return tuple(out)


def dynamic_shapes() -> dict[str, dict]:
    """``INPUTS``' dimensions B, N and L as torch.export's symbols."""
    from torch.export import Dim

    dims = {
        "B": Dim("scenes", min=1, max=65536),
        "N": Dim("agents", min=1, max=4096),
        "L": Dim("lanes", min=1, max=8192),
    }
    return {name: {i: dims[d] for i, d in enumerate(shape) if isinstance(d, str)} for name, shape, *_ in INPUTS}


def spec(  # noqa: PLR0913 - the spec's fields
    checkpoint: str,
    mode: str,
    model_cfg: dict,
    trainable_params: int,
    device: torch.device,
    checks: list[dict],
    precision: str = "32",
) -> dict:
    """What the .pt2 holds and how to call it (written inside it and beside it)."""
    return {
        "format": "torch.export ExportedProgram: torch.export.load(path).module()(*inputs)",
        "layout": LAYOUT,
        "checkpoint": str(checkpoint),
        "mode": mode,
        "model": model_cfg,
        "trainable_params": trainable_params,
        "device": str(device),
        "precision": precision,
        "torch": torch.__version__,
        "inputs": [{"name": n, "shape": list(s), "dtype": d, "meaning": m} for n, s, d, m in INPUTS],
        "outputs": [{"name": n, "shape": list(s), "dtype": d, "meaning": m} for n, s, d, m in OUTPUTS],
        "checks": checks,
    }


def _by_mode(values: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """A program's ``values`` [B, K, ...], most probable first, in the network's order of modes."""
    index = modes.view(*modes.shape, *([1] * (values.ndim - 2))).expand(values.shape)
    return torch.empty_like(values).scatter_(1, index, values)


def _compare(reference, candidate, device, float32=None) -> list[dict]:
    """The largest differences of ``candidate``'s forecasts from ``reference``'s, mode by mode, in
    metres and in probability, on random scenes of sizes other than those traced: one batch of
    AV2's largest scenes, a single scene with only its focal agent and one lane, and one between.
    A network runs in the forms programs are traced in (``traced_forms``), and modes are matched
    by the network's numbers of them (near-equal probabilities may sort otherwise). With
    ``float32`` (the network of a bf16 ``reference`` in float32), also bfloat16's own rounding
    there: ``reference``'s largest difference from it (``bf16_rounding_m``)."""
    from forecast_peft.models.layers import traced_forms

    checks = []
    with torch.no_grad():
        for scenes, agents, lanes in CHECK_SIZES:
            inputs = example_inputs(scenes, agents, lanes, device, seed=scenes + agents)
            with traced_forms():
                want_xy, want_p, want_modes = reference(*inputs)
                wanted = float32(*inputs) if float32 is not None else None
            want_xy, want_p = _by_mode(want_xy, want_modes), _by_mode(want_p, want_modes)
            xy, p, modes = candidate(*inputs)
            check = {
                "scenes": scenes,
                "agents": agents,
                "lanes": lanes,
                "max_diff_m": float((_by_mode(xy, modes) - want_xy).abs().max()),
                "max_diff_probability": float((_by_mode(p, modes) - want_p).abs().max()),
            }
            if wanted is not None:
                check["bf16_rounding_m"] = float((_by_mode(wanted[0], wanted[2]) - want_xy).abs().max())
            checks.append(check)
    return checks


def _refuse_unfaithful(checks: list[dict], what: str, roundings: int = 0) -> None:
    """A one-line error where a check differs by more than ``MAX_DIFF_M``, plus ``roundings`` times
    a bf16 check's ``bf16_rounding_m``."""

    def allowed(check: dict) -> float:
        return MAX_DIFF_M + roundings * check.get("bf16_rounding_m", 0.0)

    over = [check for check in checks if not check["max_diff_m"] <= allowed(check)]  # NaN too
    if over:
        worst = over[0]
        bf16 = (
            f": {MAX_DIFF_M:g} m plus {roundings} times bfloat16's own rounding there, {worst['bf16_rounding_m']:.3g} m"
            if roundings and "bf16_rounding_m" in worst
            else ""
        )
        raise UserError(
            f"{what} differs from the network by {worst['max_diff_m']:.3g} m on {worst['scenes']} scene(s) of "
            f"{worst['agents']} agents and {worst['lanes']} lanes (at most {allowed(worst):.3g} m allowed{bf16}): "
            f"not written; this torch ({torch.__version__}) may not export it faithfully"
        )


def export(
    network: nn.Module, device: torch.device, precision: str = "32"
) -> tuple[torch.export.ExportedProgram, list[dict]]:
    """The exported program of ``network`` (a copy in eval mode, adapters folded) on ``device``, in
    ``precision`` (32, or bf16: bfloat16 autocast inside the program, float32 in and out), and its
    checks against ``network`` itself in that precision (``_compare``). Refuses a program that
    differs by more than ``MAX_DIFF_M``."""
    if hasattr(network, "dense_others"):  # fine-tuning's network: the focal agent's forecast alone
        network.dense_others = False
    model = DeployedForecaster(network, precision).eval().to(device)
    # sizes that are neither 0 nor 1 nor any fixed dimension, so that none is traced as a constant
    traced = example_inputs(3, 37, 71, device)
    with torch.no_grad():
        program = torch.export.export(model, traced, dynamic_shapes=dynamic_shapes(), strict=False)
    float32 = DeployedForecaster(network).eval() if model.bf16 else None
    checks = _compare(model, program.module(), device, float32)
    _refuse_unfaithful(checks, "the exported program")  # in its forms it computes what the network does
    return program, checks


def compile_package(
    program: torch.export.ExportedProgram, path: Path, device: torch.device, checks: list[dict]
) -> list[dict]:
    """``program`` compiled ahead of time by AOTInductor into the package ``path``, which C++
    (``torch::inductor::AOTIModelPackageLoader``) or Python (``torch._inductor.aoti_load_package``)
    runs without the program's Python; returns its checks against the program (``_compare``; a
    bf16 program's ``checks`` give bfloat16's rounding on the same scenes, ``BF16_ROUNDINGS``).
    Needs a C++ compiler."""
    from torch import _inductor

    part = path.with_suffix(".part.pt2")
    try:
        with warnings.catch_warnings():  # torch's own copy of the program: a FutureWarning of its pytree code
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            _inductor.aoti_compile_and_package(program, package_path=str(part))
        package = _inductor.aoti_load_package(str(part))
    except Exception as err:  # noqa: BLE001 - inductor's errors are many and long: one line
        raise UserError(
            f"cannot compile {path.name} with AOTInductor ({type(err).__name__}: {reason_of(err, 300)}); it needs a "
            "C++ compiler on PATH (g++ or clang++); the .pt2 program is written"
        ) from None
    package_checks = _compare(program.module(), package, device)
    for check, own in zip(package_checks, checks, strict=True):  # the same scenes: bfloat16's rounding there
        if "bf16_rounding_m" in own:
            check["bf16_rounding_m"] = own["bf16_rounding_m"]
    checks = package_checks
    _refuse_unfaithful(checks, "the AOTInductor package", BF16_ROUNDINGS)
    part.replace(path)
    return checks


def save(program: torch.export.ExportedProgram, path: Path, about: dict) -> None:
    """``program`` to ``path`` with ``about`` inside it (``SPEC_FILE``) and beside it (NAME.json)."""
    text = json.dumps(about, indent=1)
    part = path.with_suffix(".part.pt2")  # torch.export.save wants the suffix
    try:
        torch.export.save(program, part, extra_files={SPEC_FILE: text})
    except RuntimeError as err:  # torch's writer: "[enforce fail at inline_container.cc...] open file failed ..."
        part.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write it ({reason_of(err, 200)})") from None
    part.replace(path)
    path.with_suffix(".json").write_text(text + "\n")


class _KeepReadError(logging.Filter):
    """Where torch.export.load cannot read a file in the current format, it logs the error with its
    traceback (a warning, to stderr) and then tries the 2.7 format: this filter keeps that error for
    ``load``'s one-line message instead of letting the traceback through."""

    def __init__(self):
        super().__init__()
        self.error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith("Ran into the following error when deserializing"):
            self.error = record.exc_info[1]
            return False
        return True


def load(path: str | Path) -> tuple[nn.Module, dict]:
    """The runnable program of a ``fpeft deploy`` file and its spec (what a user's code does with
    torch alone: ``torch.export.load(path).module()``)."""
    files = {SPEC_FILE: ""}
    kept = _KeepReadError()
    export_log = logging.getLogger("torch.export")
    export_log.addFilter(kept)
    try:
        with warnings.catch_warnings():  # torch 2.11 reads the weights into read-only buffers and says so
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            program = torch.export.load(str(path), extra_files=files)
    except Exception as err:  # noqa: BLE001 - torch's reading errors are many: one line
        if is_package(path):  # torch's words for it: "check the warnings above", of which there are none
            name = Path(path).name
            beside = name.removesuffix(".aoti.pt2") + ".pt2" if name.endswith(".aoti.pt2") else "NAME.pt2"
            raise UserError(
                f"{path} is an AOTInductor package, which C++ or torch._inductor.aoti_load_package runs: eval, "
                f"predict and viz take the program `fpeft deploy` wrote beside it ({beside})"
            ) from None
        # the current format's reason, not that of the 2.7 format tried after it
        err, reason = (kept.error, first_sentence(kept.error, 200)) if kept.error else (err, reason_of(err, 200))
        raise UserError(f"{path}: cannot read it as a torch.export program ({type(err).__name__}: {reason})") from None
    finally:
        export_log.removeFilter(kept)
    if not files[SPEC_FILE]:
        raise UserError(f"{path}: a torch.export program, but not one `fpeft deploy` wrote (no {SPEC_FILE} inside)")
    return program.module(), json.loads(files[SPEC_FILE])


def is_package(path: str | Path) -> bool:
    """An AOTInductor package (``fpeft deploy aoti=true``'s NAME.aoti.pt2): torch's .pt2 archive with
    compiled code under ``data/aotinductor/`` and no program to load."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/data/aotinductor/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def is_program(path: str | Path) -> bool:
    """A ``fpeft deploy`` file by its name (``.pt2``), which eval, predict and viz take as ``-c``."""
    return str(path).endswith(".pt2")


class ProgramNetwork(nn.Module):
    """A deployed program as eval, predict and viz run a network: ``forward(batch)`` gives the
    focal-frame modes ``y_hat`` and their scores ``pi`` (log-probabilities) of a batch's history."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program.requires_grad_(False)

    def train(self, mode: bool = True) -> ProgramNetwork:
        """An exported program has no training mode (its ``train()`` raises): only this flag changes."""
        self.training = mode
        return self

    def __deepcopy__(self, memo: dict) -> ProgramNetwork:
        """The same program, which nothing changes in place: ``inference_network``'s copy of it
        printed torch's FutureWarning on its pytree specs (``LeafSpec``) at every eval."""
        return ProgramNetwork(self.program).train(self.training)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        # strided views as they are: the program reads them right (only an AOTInductor package does not, LAYOUT)
        inputs = program_inputs(batch)
        # the program runs in its own precision: `--precision bf16`'s autocast would also round its
        # changes of frame (to_world's, to_focal's rotations) to bfloat16, about 1 cm in 20 m
        with torch.autocast(device_type=batch["x"].device.type, enabled=False):
            trajectories, probabilities, modes = self.program(*inputs)
            local = to_focal(trajectories, batch["origin"], batch["theta"])
        # back in the network's order of modes, so that a report's top_mode is the checkpoint's
        y_hat, probabilities = _by_mode(local, modes), _by_mode(probabilities, modes)
        return {"y_hat": y_hat, "pi": probability_scores(probabilities)}


class ProgramModule(nn.Module):
    """A ``fpeft deploy`` file where eval, predict and viz take a tuned module (``stages.load_tuned``):
    its ``model`` is the program; its rows are named ``deployed <mode>``."""

    def __init__(self, path: str | Path):
        super().__init__()
        program, self.about = load(path)
        self.model = ProgramNetwork(program)
        self.mode = f"deployed {self.about['mode']}"
        self.hparams = {"model_cfg": self.about["model"]}
        self.trainable_params = self.about.get("trainable_params")

    def check_use(
        self, path: str | Path, device: torch.device, precision: str, compiled: bool, kernel: str = "auto"
    ) -> None:
        """A program runs as exported: on its device, in its precision, with the attention it was traced with."""
        exported = torch.device(self.about["device"]).type
        if device.type != exported:
            raise UserError(f"{path} runs on {exported}, where it was exported: give device={exported}")
        own = self.about.get("precision", "32")
        if str(precision) != own:
            name = PRECISION_NAMES[own].split()[0]
            raise UserError(f"{path} is a {name} program: score it with precision={own} (--precision {own})")
        if compiled:
            raise UserError(f"{path} runs as exported: torch.compile does not apply to it (compile=false)")
        if kernel != "auto":
            raise UserError(f"{path} runs as exported: attention_kernel={kernel} does not apply to it (auto)")
