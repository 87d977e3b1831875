"""Process-wide settings that `fpeft` applies before a stage runs."""

from __future__ import annotations

import ctypes
import os
import sys
import time

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_UP_TO = 2**31 - 1  # bytes of free memory at the top of the heap kept rather than handed back
OPT_OUT = "FPEFT_SYSTEM_MALLOC"

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    By default glibc serves every block over 32 MB with a fresh mmap and unmaps it on free, so
    the large tensors of a published-size CPU step (a padded token layout of a batch is 100 MB
    and more) come back as new pages, each zero-filled by the kernel on first touch, at every
    step. Keeping freed memory in the heap (no mmap, no trimming), measured on this project's
    2-core CPU with the published sizes: 200 PEFT training steps at batch 16 took 523 s instead
    of 660 s, and a script of 12 inference passes at batch 32 26.7 s instead of 32.2 s; resident
    memory grows by 10-40% (training 5.1 -> 7.1 GB after 200 steps, levelling off; the inference
    script 1.1 -> 1.3 GB).

    Skipped (returns False) off Linux/glibc, when another allocator is preloaded (LD_PRELOAD),
    when the environment already sets any MALLOC_* variable, or with FPEFT_SYSTEM_MALLOC=1.
    DataLoader workers forked afterwards inherit the setting; those that forkserver or spawn
    starts apply it where this process did (``freed_memory_kept``, ``dataset.start_worker``)."""
    global _kept
    if _kept is None:
        _kept = _apply()
    return _kept


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` applied its setting in this process."""
    return bool(_kept)


def _apply() -> bool:
    env = os.environ
    if env.get(OPT_OUT, "") not in ("", "0") or "LD_PRELOAD" in env or any(k.startswith("MALLOC_") for k in env):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO) == 1


# progress into a log file or a pipe (a batch job's output, `| tee`): a line at most this often
LOG_LINE_INTERVAL_S = 30.0


def on_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal, where a progress bar redraws itself in place; a log file
    or a pipe keeps every redraw, carriage returns and all, as one ever longer line."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``42 s``, ``12:05`` (minutes and seconds) or ``3:12:05`` (hours too)."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLines:
    """tqdm's output for a log file or a pipe: a status it draws as a line of its own, at most one
    every ``LOG_LINE_INTERVAL_S`` seconds, and the last one held back where the bar ends (tqdm's
    newline); work done within the interval says so in one line. What tqdm writes to clear its
    line (for ``tqdm.write``'s messages) is dropped."""

    def __init__(self, stream):
        self.stream = stream
        self.clock = time.monotonic
        self.interval_s = LOG_LINE_INTERVAL_S
        self.written_at = self.clock()
        self.held: str | None = None

    def write(self, text: str) -> None:
        status = text.replace("\r", "").strip()
        if not status:
            if "\n" in text and self.held is not None:  # the bar's end
                self._line(self.held)
            return
        now = self.clock()
        if now - self.written_at >= self.interval_s:
            self._line(status)
        else:
            self.held = status

    def _line(self, status: str) -> None:
        self.stream.write(status + "\n")
        self.written_at, self.held = self.clock(), None

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar (on stderr unless ``file``): on a terminal as tqdm draws it; into a log file or
    a pipe as lines (``ProgressLines``), and kept at its end (``leave``), so that the log says how
    long the work took."""
    from tqdm import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    if not on_terminal(stream):
        kwargs.update(file=ProgressLines(stream), leave=True)
    else:
        kwargs["file"] = stream
    return tqdm(iterable, **kwargs)


def say(*args, **kwargs) -> None:
    """``print`` in the first process of a multi-process launch only: every process of a
    multi-GPU run goes through the same stage, and one line per process says nothing more."""
    if launch_rank() == 0:
        print(*args, **kwargs)


def launch_rank() -> int:
    """This process's rank in a multi-process launch, before any process group exists: from the
    variables that torchrun (RANK, LOCAL_RANK), Lightning's own launcher (LOCAL_RANK) and SLURM
    (SLURM_PROCID) set, in the order Lightning reads them; 0 when none is set."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def env_count(name: str) -> int | None:
    """A whole number that a launcher gives in the variable ``name`` (None where it is not set, or
    not one number)."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def torchrun_processes() -> tuple[int, int | None, int | None] | None:
    """The processes torchrun started: in all, per node and the nodes (None where it does not say);
    None where this process was not started by torchrun."""
    from torch.distributed import is_available, is_torchelastic_launched

    total = env_count("WORLD_SIZE")
    if not (is_available() and is_torchelastic_launched()) or total is None:
        return None
    per_node = env_count("LOCAL_WORLD_SIZE") or None
    return total, per_node, total // per_node if per_node and total % per_node == 0 else None


def refuse_unguarded_script(processes: str, instead: str) -> None:
    """Refuse to start ``processes`` by spawn or forkserver from a script that runs fpeft outside
    ``if __name__ == "__main__":``: Python's multiprocessing imports the main script again in
    each process it starts so, which then runs the script's code again. A spawn pool's processes
    failed at that and were started again for ever (17,000 lines of tracebacks in a minute of
    `generate(..., workers=2)`), and the DataLoader workers of an unguarded training script ran
    its code again before failing. The error (``UserError``) names the script's line and
    ``instead``, the other way; a call from inside the guard, from a package's ``__main__``
    (``python -m forecast_peft``), an interactive session or ``python -c`` passes."""
    import ast
    from pathlib import Path

    from forecast_peft.errors import UserError

    module = sys.modules.get("__main__")
    if not _runs_again(module):
        return
    main = vars(module)
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is main):
        frame = frame.f_back
    if frame is None:  # not called from the main script's own code
        return
    path, line = frame.f_code.co_filename, frame.f_lineno
    try:
        tree = ast.parse(Path(path).read_bytes(), path)
    except (OSError, SyntaxError, ValueError):  # "<string>", "<stdin>", a notebook's cell
        return
    if any(_main_guard(node) and node.lineno <= line <= node.end_lineno for node in ast.walk(tree)):
        return
    raise UserError(
        f'{path}:{line}: this script runs fpeft outside `if __name__ == "__main__":`, and the {processes} '
        f"that fpeft starts would each run the script again: put its code under that `if`, or {instead}"
    )


def _runs_again(main) -> bool:
    """Whether Python's multiprocessing runs the main module ``main`` again in each process that
    spawn or forkserver start, as ``multiprocessing.spawn`` decides: a module run by name
    (``python -m pkg.mod``) other than a package's ``__main__``, or a script run by its path (a
    console script such as ``fpeft``, itself guarded; IPython's launcher excepted)."""
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return name != "__main__" and not name.endswith(".__main__")
    path = getattr(main, "__file__", None)
    return path is not None and os.path.splitext(os.path.basename(path))[0] != "ipython"


def _main_guard(node) -> bool:
    """Whether ``node`` is ``if __name__ == "__main__":`` (either way round)."""
    import ast

    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    if len(test.ops) != 1 or not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    values = [s.value for s in sides if isinstance(s, ast.Constant)]
    return names == ["__name__"] and values == ["__main__"]
