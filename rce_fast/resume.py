"""Time-boxed, resumable long work: budgets, clean stops, signals, atomic files, settings.

A long run is a sequence of *units*. A divisible unit (training, a C&W search) runs in
chunks of steps: before each chunk it asks its :class:`Budget` how many steps it may run
(:meth:`Budget.grant`). The budget answers from the time per step measured on the
chunks before (the first chunk of each kind is a one-step probe), keeping a reserve
for saving, and answers 0 when not even one more step fits; the unit then saves its
whole state and raises :class:`StopRequested`. If not even the first piece of work of a
session fits, :class:`BudgetTooSmall` is raised instead (the same budget would never
make progress). An indivisible unit (FGSM, JSMA, the
detector) asks :meth:`Budget.allow` with an estimate of its time. So a run stops
*before* starting work that would not fit, instead of being killed in the middle of it.

Chunks are sized from the clock read at these points. On CUDA the budget
synchronises once per chunk (``sync``), so that the measured time is the device's
and not the host's queueing time: chunks are sized to take about ``chunk_seconds``,
which makes that one sync per many steps.

SIGTERM and SIGINT (:func:`handle_signals`) set :attr:`Budget.interrupted`, which
chunked units read (no device sync) before every step; they then save and stop at
once. :attr:`Budget.interrupted` also turns True when the time left is down to the
reserve: a chunk that runs slower than planned (a neighbour took the CPU, a GPU
throttled) still stops in time, at the step where the time ran out. That reads the
host's clock once per step (tens of nanoseconds, no sync). Inside an indivisible unit (:meth:`Budget.abandonable`) the
signal abandons the unit immediately: it is redone on the next run. A second signal
stops at once wherever the run is; files are still never half-written, since every
write here is atomic (:func:`atomic_write`).

For tests, ``stop_after=K`` makes the budget refuse the (K+1)-th grant, and ``clock`` can
be any function returning seconds: where a run stops is then deterministic.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import signal
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")

from ._args import scalar
from ._io import atomic_torch_save, atomic_write, atomic_write_text  # noqa: F401 (re-exported)

#: The exit status of a run that stopped early and can be continued.
EXIT_NOT_FINISHED = 3


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class StopRequested(Exception):
    """Raised at a safe point once the state of the work is saved: the work is not
    finished, and running the same call (or command) again continues it."""

    def __init__(self, reason: str = "stop requested") -> None:
        super().__init__(reason)
        self.reason = reason


class ResumeMismatch(ValueError):
    """Saved state was written with other settings than the ones given now."""


class BudgetTooSmall(ValueError):
    """Not even the first piece of work of a session fits in its time budget: another
    run with the same budget would make no progress either."""


class Budget:
    """Decides, at safe points, whether more work fits in a time budget.

    Args:
        seconds: the time budget, counted from construction; None for no limit (the
            budget then only relays signals and the ``stop_after`` hook).
        clock: a function returning seconds (default ``time.monotonic``); tests pass a
            fake one.
        reserve: seconds kept free at the end for the final save and the exit (default
            3% of ``seconds``, at least 5 and at most 30: a Python process with torch
            loaded takes a second or more to exit on a busy machine), to which twice
            the slowest state save seen is added.
        safety: the measured time per step is multiplied by this before a chunk is
            judged to fit (steps get slower, for instance when a GPU throttles).
        chunk_seconds: target duration of one chunk (how often the clock is read).
        max_chunk: optional cap on the steps of one chunk.
        stop_after: refuse every grant after this many (a deterministic stop for tests).
        stop_if: ``stop_if(kind, grants) -> bool``, asked before each grant with the kind
            asked for and the grants so far; True refuses (a deterministic stop at a
            chosen place, for tests).
        sync: called before the clock is read at the end of a chunk
            (``torch.cuda.synchronize`` on CUDA).
        spent: seconds of the budget already used when the budget is made (the command
            line passes :func:`process_age`: the interpreter's start and the imports).
    """

    def __init__(self, seconds: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 reserve: float | None = None, safety: float = 1.25,
                 chunk_seconds: float = 20.0, max_chunk: int | None = None,
                 stop_after: int | None = None,
                 stop_if: Callable[[str, list], bool] | None = None,
                 sync: Callable[[], None] | None = None, spent: float = 0.0) -> None:
        seconds, max_chunk, stop_after = (scalar(v) for v in (seconds, max_chunk, stop_after))
        if seconds is not None and not (isinstance(seconds, numbers.Real)
                                        and not isinstance(seconds, bool)
                                        and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be a finite number > 0 or None, got {seconds!r}")
        safety, chunk_seconds, reserve, spent = (
            scalar(v) for v in (safety, chunk_seconds, reserve, spent))
        for name, value in (("safety", safety), ("chunk_seconds", chunk_seconds),
                            ("reserve", reserve), ("spent", spent)):
            if value is None and name == "reserve":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            # chunk_seconds may be inf (chunks not limited by time); nothing may be NaN
            if math.isnan(value) or (math.isinf(value) and name != "chunk_seconds"):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if not (safety >= 1.0):
            raise ValueError(f"safety must be >= 1, got {safety!r}")
        if not chunk_seconds > 0:
            raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds!r}")
        if reserve is not None and reserve < 0:
            raise ValueError(f"reserve must be >= 0 seconds or None, got {reserve!r}")
        if max_chunk is not None and (not _is_int(max_chunk) or max_chunk < 1):
            raise ValueError(f"max_chunk must be a positive int or None, got {max_chunk!r}")
        if stop_after is not None and (not _is_int(stop_after) or stop_after < 0):
            raise ValueError(f"stop_after must be an int >= 0 or None, got {stop_after!r}")
        self.seconds = None if seconds is None else float(seconds)
        self.clock = clock
        self.started = clock() - max(0.0, float(spent))
        if reserve is None:
            reserve = 0.0 if seconds is None else min(30.0, max(5.0, 0.03 * seconds))
        self.reserve = float(reserve)
        self.safety, self.chunk_seconds = float(safety), float(chunk_seconds)
        self.max_chunk = None if max_chunk is None else int(max_chunk)
        self.stop_after = None if stop_after is None else int(stop_after)
        self.sync = sync
        self.stop_if = stop_if
        #: Why the budget refused (None while it has not).
        self.stop_reason: str | None = None
        #: The name of the signal received, if any.
        self.signal: str | None = None
        #: Every grant, in order: (kind, steps). Tests pick stop points from it.
        self.grants: list[tuple[str, int]] = []
        self._rates: dict[str, list[float]] = {}
        self._open: tuple[str, int, float] | None = None
        self._abandon = 0
        self._slowest_save = 0.0

    # -- time
    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        """Seconds left (inf without a limit)."""
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def _spare(self) -> float:
        return self.left() - self.reserve - 2.0 * self._slowest_save

    def rate(self, kind: str) -> float | None:
        """Seconds per step of ``kind``: the slowest of its last three chunks."""
        seen = self._rates.get(kind)
        return max(seen[-3:]) if seen else None

    def note_save(self, seconds: float) -> None:
        """Record how long a state save took (the reserve grows to twice the slowest)."""
        self._slowest_save = max(self._slowest_save, float(seconds))

    # -- decisions
    @property
    def interrupted(self) -> bool:
        """True once SIGTERM or SIGINT arrived, or once the time left is down to the
        reserve (the planned chunk ran slower than measured). Read before every step
        of a chunk; the unit then saves its state and stops."""
        if self.signal is not None:
            return True
        if self.seconds is not None and self._spare() <= 0:
            if self.stop_reason is None:
                self.stop_reason = "time budget"
            return True
        return False

    def _refusal(self, kind: str) -> str | None:
        if self.signal is not None:
            return f"{self.signal} received"
        if self.stop_after is not None and len(self.grants) >= self.stop_after:
            return f"stop_after={self.stop_after} reached"
        if self.stop_if is not None and self.stop_if(kind, self.grants):
            return f"stop_if at {kind!r}"
        return None

    def _refuse(self, reason: str) -> int:
        self.stop_reason = reason
        return 0

    def _out_of_time(self, kind: str, need: float) -> int:
        """Refuse for lack of time; at the session's first piece of work that would
        mean never progressing, so raise BudgetTooSmall instead."""
        if not self.grants:
            raise BudgetTooSmall(
                f"time budget of {self.seconds:g} s is too small: {self.elapsed():.0f} s "
                f"went to starting up and the first piece of work ({kind}) needs about "
                f"{need + self.reserve:.0f} s more by estimate (a reserve of "
                f"{self.reserve:.0f} s included); give a larger --time-budget")
        return self._refuse("time budget")

    def grant(self, kind: str, remaining: int) -> int:
        """How many of the ``remaining`` steps of ``kind`` to run now (0: stop here).

        Ends the chunk still open, if any. Call :meth:`done` when the chunk is over."""
        self.done()
        reason = self._refusal(kind)
        if reason is not None:
            return self._refuse(reason)
        n = int(remaining)
        if n <= 0:
            return 0
        if self.max_chunk is not None:
            n = min(n, self.max_chunk)
        rate = self.rate(kind)
        if rate is None:
            if self.seconds is not None:
                if self._spare() <= 0:
                    return self._out_of_time(kind, 0.0)
                n = 1  # probe: one step measures the rate
        else:
            if math.isfinite(self.chunk_seconds):
                n = min(n, max(1, int(self.chunk_seconds / max(rate, 1e-9))))
            if self.seconds is not None:
                fits = int(self._spare() / (max(rate, 1e-9) * self.safety))
                if fits < 1:
                    return self._out_of_time(kind, rate * self.safety)
                # Plan at most half of what is left per chunk: the last chunks shrink, so
                # a machine that slows down late (a busy neighbour) is noticed in time.
                n = min(n, max(1, fits // 2))
        self.grants.append((kind, n))
        self._open = (kind, n, self.clock())
        return n

    def allow(self, kind: str, estimate: float | None = None) -> bool:
        """Whether an indivisible unit of ``kind`` may start now, given an estimate of
        its seconds (the slowest earlier unit of the same kind counts too). Call
        :meth:`done` when it is over."""
        self.done()
        reason = self._refusal(kind)
        if reason is not None:
            self._refuse(reason)
            return False
        if self.seconds is not None:
            known = [v for v in (estimate, self.rate(kind)) if v is not None]
            need = self.safety * max(known) if known else 0.0
            if self._spare() <= need:
                self._out_of_time(kind, need)
                return False
        self.grants.append((kind, 1))
        self._open = (kind, 1, self.clock())
        return True

    def run_unit(self, kind: str, estimate: float | None, work: Callable[[], T]) -> T:
        """Run ``work()`` as one indivisible unit: raise :class:`StopRequested` before it
        if it does not fit (:meth:`allow`); a signal during it abandons it (it is redone
        next run). Returns what ``work`` returns."""
        if not self.allow(kind, estimate):
            raise StopRequested(self.stop_reason or "stop requested")
        with self.abandonable():
            out = work()
        self.done()
        return out

    def done(self, steps: int | None = None) -> None:
        """Close the open chunk or unit; ``steps`` actually run (default: all granted)."""
        if self._open is None:
            return
        kind, n, t0 = self._open
        self._open = None
        if self.sync is not None:
            self.sync()
        k = n if steps is None else int(steps)
        if k > 0:
            self._rates.setdefault(kind, []).append((self.clock() - t0) / k)

    # -- signals
    def request_stop(self, name: str) -> None:
        """What a signal handler calls: stop at the next safe point. Inside an
        indivisible unit, or at a second signal, raise :class:`StopRequested` now."""
        again = self.signal is not None
        self.signal = name
        self.stop_reason = f"{name} received"
        if self._abandon > 0 or again:
            raise StopRequested(self.stop_reason)

    @contextlib.contextmanager
    def abandonable(self) -> Iterator[None]:
        """Marks an indivisible unit: a signal abandons it at once (it is redone next
        run). Its results must only be recorded after the block."""
        self._abandon += 1
        try:
            yield
        finally:
            self._abandon -= 1


def process_age() -> float:
    """Seconds since this process started, from /proc on Linux (0 where unknown): a
    time budget also covers the interpreter's start and the imports before it is made."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
    return age if 0.0 <= age < 86400.0 else 0.0


@contextlib.contextmanager
def handle_signals(budget: Budget, signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """SIGTERM and SIGINT call ``budget.request_stop`` while the block runs (main thread
    only; elsewhere this does nothing). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        budget.request_stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class WorkControl:
    """What a resumable unit (``cw_l2``, ``cw_wb``, ``train``) is handed: the budget, the
    state saved by an earlier run (``saved``, None on a fresh start) and ``save``, which
    writes the unit's state dict durably.

    Units call :meth:`grant` / :meth:`done` around chunks of steps, read
    :attr:`interrupted` before each step, and call :meth:`stop` (save, then raise
    :class:`StopRequested`) when either says so. ``autosave_seconds``: also save at a
    chunk boundary (:meth:`chunk_boundary`) when this much time passed since the last
    save, so that even a SIGKILL loses little.
    """

    def __init__(self, budget: Budget, save: Callable[[dict], None],
                 saved: dict | None = None, autosave_seconds: float | None = None) -> None:
        self.budget, self._save, self.saved = budget, save, saved
        self.autosave_seconds = autosave_seconds
        self._last_save = budget.clock()

    @property
    def interrupted(self) -> bool:
        return self.budget.interrupted

    def grant(self, kind: str, remaining: int) -> int:
        return self.budget.grant(kind, remaining)

    def done(self, steps: int | None = None) -> None:
        self.budget.done(steps)

    def save(self, state: dict) -> None:
        t0 = self.budget.clock()
        self._save(state)
        self._last_save = self.budget.clock()
        self.budget.note_save(self._last_save - t0)

    def chunk_boundary(self, state_fn: Callable[[], dict]) -> None:
        """Autosave if due (call between chunks)."""
        if (self.autosave_seconds is not None
                and self.budget.clock() - self._last_save >= self.autosave_seconds):
            self.save(state_fn())

    def stop(self, state_fn: Callable[[], dict]):
        """Save the state and raise :class:`StopRequested`."""
        self.save(state_fn())
        raise StopRequested(self.budget.stop_reason or "stop requested")

    def nested(self, wrap: Callable[[dict], dict], saved: dict | None) -> "WorkControl":
        """A view for a sub-unit (a stage of C&W-wb): its state is saved as
        ``wrap(state)``, and it resumes from ``saved``."""
        sub = WorkControl(self.budget, lambda s: self.save(wrap(s)), saved,
                          self.autosave_seconds)
        sub._last_save = self._last_save
        return sub


# ------------------------------------------------------------------------------ files

# atomic_write, atomic_torch_save, atomic_write_text: one implementation, in _io.


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_folder(folder: Path, label: str, target: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".rce_fast_probe_", dir=folder)
    except OSError as exc:
        raise ValueError(f"{label} {target}: cannot write in folder {folder} "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def _make_folder(folder: Path, label: str, target: Path) -> None:
    base = _first_existing(folder)
    if base.exists() and not base.is_dir():
        raise ValueError(f"{label} {target}: cannot create it, {base} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{label} {target}: cannot create folder {folder} "
                         f"({exc.strerror or exc})") from None


def check_output_file(path, label: str = "--out", inputs: dict | None = None) -> Path:
    """Make sure a file can be written at ``path`` before long work starts: the path is
    not a folder, its folder exists or can be created, and a file can be created in it.
    ``inputs`` ({label: path or None}): files the work reads, which ``path`` must not be
    (writing it would replace one of them). Raises ValueError naming the path otherwise.
    Creates the missing parent folders."""
    path = Path(path)
    try:
        is_dir, exists, is_file = path.is_dir(), path.exists(), path.is_file()
    except OSError as exc:  # a name too long for the filesystem, on some Pythons
        raise ValueError(f"{label} {path}: cannot be used ({exc.strerror or exc})") from None
    if is_dir:
        raise ValueError(f"{label} {path}: is a folder, expected a file path")
    if exists and not is_file:
        raise ValueError(f"{label} {path}: exists and is not a regular file")
    for other_label, other in (inputs or {}).items():
        if other is None:
            continue
        try:
            same = exists and os.path.samefile(path, other)
        except OSError:  # the input is missing: its own check reports that
            same = False
        if same:
            raise ValueError(f"{label} {path} is also {other_label}: writing it would "
                             f"replace that input; choose another {label}")
    folder = path.parent if str(path.parent) else Path(".")
    _make_folder(folder, label, path)
    _probe_folder(folder, label, path)
    if not path.exists():  # the name itself (too long, not allowed by the filesystem)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise ValueError(f"{label} {path}: cannot be created "
                             f"({exc.strerror or exc})") from None
        os.close(fd)
        os.unlink(path)
    elif not os.access(path, os.W_OK):
        raise ValueError(f"{label} {path}: exists and is not writable")
    return path


def check_output_folder(path, label: str = "--out") -> Path:
    """Make sure ``path`` is (or can be created as) a writable folder; ValueError naming
    the path otherwise. Creates it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} {path}: exists and is not a folder")
    _make_folder(path, label, path)
    _probe_folder(path, label, path)
    return path


# ------------------------------------------------------------------ compact tensors

def pack_like(t, ref) -> dict:
    """Lossless, compact storage of ``t`` (adversarial images) next to ``ref`` (the clean
    images, same shape), zlib-compressed in whichever of three layouts is smallest:
    the raw bytes (best where values repeat, as after FGSM on quantised pixels), the
    bits XOR those of the clean value (zero wherever a pixel did not change, as after
    JSMA), or those XORed bits split into byte planes (best for the dense small
    changes of C&W)."""
    import numpy as np
    import torch

    a = t.detach().cpu().contiguous()
    r = ref.detach().cpu().to(a.dtype).contiguous()
    if a.shape != r.shape:
        raise ValueError(f"pack_like: shapes differ, {tuple(a.shape)} and {tuple(r.shape)}")
    size = a.element_size()
    bits = _int_of_size(size)
    xor = (a.view(bits) ^ r.view(bits)).numpy()
    layouts = {"zlib": a.view(bits).numpy().tobytes(), "xor-zlib": xor.tobytes(),
               "xor-planes-zlib": np.ascontiguousarray(
                   xor.view(np.uint8).reshape(-1, size).T).tobytes()}
    codec, data = min(((k, zlib.compress(v, 6)) for k, v in layouts.items()),
                      key=lambda kv: len(kv[1]))
    return {"codec": codec, "dtype": str(a.dtype).replace("torch.", ""),
            "shape": list(a.shape), "data": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def unpack_like(packed: dict, ref):
    """The tensor stored by :func:`pack_like` (bit for bit)."""
    import numpy as np
    import torch

    dtype = getattr(torch, packed["dtype"])
    r = ref.detach().cpu().to(dtype).contiguous()
    size = r.element_size()
    bits = _int_of_size(size)
    raw = np.frombuffer(zlib.decompress(packed["data"].numpy().tobytes()), dtype=np.uint8)
    if packed["codec"] == "xor-planes-zlib":
        raw = np.ascontiguousarray(raw.reshape(size, -1).T).reshape(-1)
    elif packed["codec"] not in ("zlib", "xor-zlib"):
        raise ValueError(f"unknown codec {packed['codec']!r}")
    t = torch.from_numpy(raw.copy()).view(bits).reshape(packed["shape"])
    if packed["codec"] != "zlib":
        t = t ^ r.view(bits)
    return t.view(dtype)


def _int_of_size(size: int):
    import torch
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


# --------------------------------------------------------------------------- settings

def _plain(value):
    """A NumPy number or a 0-d tensor as the Python number it holds; else str()."""
    held = scalar(value.item() if isinstance(value, np.generic) else value)
    return held if isinstance(held, (bool, int, float)) else str(value)


def normalise(value):
    """A JSON round trip: tuples become lists, keys strings, NumPy numbers and 0-d
    tensors Python numbers (so saved and current settings compare equal when they are,
    whatever number type either run was given)."""
    return json.loads(json.dumps(value, default=_plain))


def settings_diff(saved: dict, current: dict) -> list[str]:
    """``"name: <saved> before, <current> now"`` for every setting that differs."""
    saved, current = normalise(saved), normalise(current)
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "(not set)"), current.get(key, "(not set)")
        if a != b:
            out.append(f"{key}: {a!r} before, {b!r} now")
    return out
