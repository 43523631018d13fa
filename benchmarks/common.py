"""Measurement helpers of the ratio benchmarks (``benchmarks.run``): time, memory, FLOPs, isolation, tables.

The helpers time a callable, read a process's memory high-water mark, count the FLOPs of a piece of
torch code (with the formulas torch's counter lacks from their owner, :func:`ray_jobs.memory_plan.
flop_formulas`), measure the dense-matmul peak of the machine, run a function in a fresh process and
render the markdown table.

    peak = matmul_peak_flops(torch.float32, "cpu")              # best-of-N large square torch.mm, FLOP/s
    flops = count_flops(lambda: model(x).sum().backward())      # exact, from torch.utils.flop_counter
    result = run_isolated(case_fn, arg, preload=("torch",))     # fresh process: own RSS high-water mark
    order = interleaved(["A", "B"], repeats=3)                  # A B, B A, A B (counterbalanced)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as _dt
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

MIB = 2**20


# ------------------------------------------------------------------------------------------ statistics
def median(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over repeats of ``a_i / b_i``: each repeat's two arms ran next to each other, so a slow
    patch of a shared machine cancels in the ratio of the pair instead of biasing one arm."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs two equally long non-empty lists, got {len(a)} and {len(b)}")
    return median(x / y for x, y in zip(a, b, strict=True))


def interleaved(arms: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """``(repeat, arm)`` in run order: each repeat runs every arm once, the order rotated by one arm per
    repeat (two arms: A B, B A, A B, ...) so no arm always runs first (warm caches, load drift)."""
    if repeats < 1 or not arms:
        raise ValueError("interleaved needs at least one arm and one repeat")
    order = []
    for r in range(repeats):
        k = r % len(arms)
        order.extend((r, arm) for arm in [*arms[k:], *arms[:k]])
    return order


# ------------------------------------------------------------------------------------------ timing
def time_steps(step: Callable[[], Any], *, warmup: int, steps: int, sync: Callable[[], None] | None = None):
    """Run ``step`` ``warmup + steps`` times; the seconds of each timed call (warm-up excluded)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    times = []
    for i in range(warmup + steps):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        step()
        if sync is not None:
            sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ memory
def _proc_status_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` in MiB (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / MIB  # kB
    except OSError:
        return None
    return None


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    value = _proc_status_mib("VmRSS")
    if value is not None:
        return value
    import psutil

    return psutil.Process().memory_info().rss / MIB


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set size, MiB (``VmHWM``; ``ru_maxrss`` elsewhere).

    A process forked from a parent starts its high-water mark at its RSS at fork time, so measure peaks
    in fresh processes and subtract a baseline taken after the imports (:func:`memory_report`).
    """
    value = _proc_status_mib("VmHWM")
    if value is not None:
        return value
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / MIB if sys.platform == "darwin" else maxrss * 1024 / MIB  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Start a new peak: hand freed heap memory back to the OS (glibc ``malloc_trim``) and reset this
    process's RSS high-water mark to its current RSS (Linux: ``5`` into ``/proc/self/clear_refs``), so that
    :func:`peak_rss_mib` afterwards is the peak of what follows (e.g. the training steps without the
    transient copies of model loading). Returns False where the reset is unsupported."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def fixed_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """glibc: serve every allocation of ``nbytes`` or more with its own ``mmap`` from now on, so that a freed
    tensor leaves the RSS at once. By default glibc raises that threshold (up to 32 MiB) whenever such a block
    is freed, and tensors below it then come from heaps that stay resident, fragmented, after they are
    freed: an RSS peak that depends on the order of allocations (DeepSpeed ZeRO's flat buffers, gathers and
    partitions fragment most) more than on what is live. Setting the threshold turns that adjustment off
    (``mallopt(M_MMAP_THRESHOLD)``, as the ``MALLOC_MMAP_THRESHOLD_`` variable would at start-up). Returns
    False where unsupported."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6").mallopt(-3, nbytes) == 1  # -3: M_MMAP_THRESHOLD
    return False


def memory_baseline(device: str = "cpu") -> float:
    """What :func:`memory_report` subtracts: current RSS (CPU) or allocated bytes (CUDA), MiB."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MIB
    return rss_mib()


def memory_report(baseline_mib: float, device: str = "cpu") -> dict[str, float]:
    """``peak_mib`` (process RSS high-water mark, or CUDA max allocated), ``baseline_mib`` and ``delta_mib``
    (peak − baseline: what the model, optimizer, activations and data added after the imports)."""
    if device.startswith("cuda"):
        import torch

        peak = torch.cuda.max_memory_allocated() / MIB
    else:
        peak = peak_rss_mib()
    return {"peak_mib": peak, "baseline_mib": baseline_mib, "delta_mib": peak - baseline_mib}


# ------------------------------------------------------------------------------------------ FLOPs
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch dispatches it (matmuls, convolutions, attention; a multiply-add
    counts 2), from :class:`torch.utils.flop_counter.FlopCounterMode`. Elementwise ops are not counted,
    which is the usual convention of model FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from ray_jobs.memory_plan import flop_formulas  # the CPU flash-attention kernels torch's counter lacks

    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_flops(
    dtype=None, device: str = "cpu", *, n: int | None = None, repeats: int = 5, min_seconds: float = 0.2
) -> float:
    """Measured dense-matmul peak of this machine in ``dtype``: FLOP/s of the best of ``repeats`` timings of
    a large square ``torch.mm`` (``2 n^3`` FLOPs per product), each timing at least ``min_seconds`` long.
    Uses the current ``torch.get_num_threads()`` on CPU."""
    import torch

    dtype = dtype or torch.float32
    if n is None:
        n = 8192 if device.startswith("cuda") else 2048
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)  # warm-up (library init, GPU clocks)
    sync()
    best = 0.0
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            calls += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        best = max(best, 2.0 * n**3 * calls / elapsed)
    return best


# ------------------------------------------------------------------------------------------ isolation
def run_isolated(
    fn: Callable[..., Any],
    *args: Any,
    preload: Sequence[str] = (),
    timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """``fn(*args, **kwargs)`` in a fresh process; returns its (picklable) result, re-raises its exception.

    The process is forked from a ``forkserver`` that imported ``preload`` once (so each case skips the
    multi-second torch/diffusers import, yet starts from a clean interpreter with no threads, Ray
    connection or model of the caller). ``fn`` must be importable (a module-level function).
    """
    ctx = mp.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args, **kwargs).result(timeout=timeout)


def wait_until_quiet(*, below_cores: float = 0.25, window: float = 1.0, timeout: float = 30.0) -> float:
    """Wait until this process's descendants (a local Ray's raylet, workers and actors, fork servers) use
    less than ``below_cores`` CPUs together over ``window`` seconds, or ``timeout`` passed; returns the
    seconds waited. Between arms: actors of a finished Ray run keep running for seconds after
    ``fit()`` returns, and Ray prestarts idle workers, which would slow the next arm's first steps."""
    import psutil

    t0 = time.perf_counter()
    while True:
        procs = psutil.Process().children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.cpu_percent(None)  # starts the measurement window
        time.sleep(window)
        used = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                used += p.cpu_percent(None) / 100.0
        waited = time.perf_counter() - t0
        if used < below_cores or waited >= timeout:
            if used >= below_cores:
                logger.warning("still %.2f CPUs busy in child processes after %.0f s; going on", used, waited)
            return waited


@contextlib.contextmanager
def torch_threads(n: int):
    """Set torch's intra-op threads for a block (and restore them)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------ table
@dataclasses.dataclass
class Row:
    """One line of the results table: ``ratio = a / b``; ``higher_is_better`` says which arm wins."""

    benchmark: str
    arm_a: str
    arm_b: str
    a: float | None
    b: float | None
    unit: str
    ratio: float | None = None
    higher_is_better: bool = True
    notes: str = ""
    status: str = "ok"  # "ok" | "skipped (...)" | "failed: ..."
    digits: int = 3
    bold: bool = True  # mark the better arm (False where A and B are not alternatives, e.g. MFU)

    def cells(self) -> list[str]:
        if self.status != "ok":
            notes = f"{self.status}; {self.notes}" if self.notes else self.status
            return [self.benchmark, self.arm_a, self.arm_b, "—", self.unit, notes]
        a, b = fmt(self.a, self.digits), fmt(self.b, self.digits)
        ratio = self.ratio
        if ratio is None and self.a is not None and self.b:
            ratio = self.a / self.b
        if self.bold and ratio is not None and self.a is not None and self.b is not None and ratio != 1.0:
            a_wins = (ratio > 1.0) == self.higher_is_better
            if a_wins:
                a = f"**{a}**"
            else:
                b = f"**{b}**"
        return [
            self.benchmark,
            f"{self.arm_a}: {a}",
            f"{self.arm_b}: {b}",
            "—" if ratio is None else f"{ratio:.3f}",
            self.unit,
            self.notes,
        ]


TABLE_HEADER = ("benchmark", "arm A", "arm B", "ratio A/B", "unit", "notes")


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no exponent for ordinary magnitudes)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:,.{decimals}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a GitHub markdown table (the better arm of each row in bold)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    out = [line(TABLE_HEADER), line(["---"] * len(TABLE_HEADER))]
    out.extend(line(r.cells()) for r in rows)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def machine_info() -> dict[str, str]:
    """CPU model, cores, memory, GPU, library versions and the date (for the results header)."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _cpu_model(),
        "cores": f"{usable} usable of {os.cpu_count()} logical",
        "cpu capability": str(torch.backends.cpu.get_cpu_capability()),
        "load average (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "deepspeed": _version("deepspeed"),
        "diffusers": _version("diffusers"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        import psutil

        info["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    return info


@contextlib.contextmanager
def workers_run(loop):
    """``prefopt train`` starts ``loop`` on its Ray Train workers instead of the recipe's
    ``train_loop_per_worker``, for the duration of the block only."""
    from unittest import mock

    from ray_jobs.training import recipe

    with mock.patch.object(recipe, "train_loop_per_worker", loop):
        yield
