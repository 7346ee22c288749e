"""Where and at what precision code runs: one object, resolved once, passed everywhere.

Behaviour (shuffling, augmentation, schedules) never depends on the device; only speed does.

torch is imported by the functions that use it, not here: the command line reads DEVICES and PRECISIONS
to build its options (config's settings table), and its start-up, like `fashionlab serve --workers N`'s
supervisor process, never needs torch (2 s and 220 MiB).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ArgumentError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix work runs natively (several times fp32 speed). Not when oneDNN,
    which runs the convolutions, is held below those instructions (ONEDNN_MAX_CPU_ISA=AVX2, say): bf16
    would then be emulated, far slower than fp32."""
    import torch
    if not onednn_allows_bf16():
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return False


def cpu_has_amx() -> bool:
    """AMX tiles that oneDNN may use: bf16 matrix work then runs at several times the AVX-512 BF16 rate
    (1.46 TFLOP/s on 2 cores of an Intel Xeon, against 0.41 with AVX-512 BF16 on a 2-core AMD EPYC;
    docs/records.md), so a recipe can afford more arithmetic per image (its `cpu-amx` rule). Not when
    ONEDNN_MAX_CPU_ISA holds oneDNN below AMX."""
    import torch
    if not onednn_allows("AMX"):
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return False


def onednn_allows_bf16() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA), when set, lets oneDNN use native bf16."""
    return onednn_allows("BF16") or onednn_allows("AMX")


def onednn_allows(instructions: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA), when set, names a level that includes these
    instructions ("BF16", "AMX"): its values name what they add (AVX512_CORE_BF16, AVX512_CORE_AMX)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return cap == "ALL" or instructions in cap


def resolve_device(name: str = "auto") -> torch.device:
    import torch
    if name not in DEVICES:
        raise ArgumentError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda: no CUDA device is available to this PyTorch build")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ArgumentError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16()
    return False  # MPS autocast support varies by OS version; fp32 is the safe default


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" or "bf16" (resolved, never "auto")
    channels_last: bool

    def autocast(self):
        import torch
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def random_device(self) -> torch.device:
        """Where training's random draws (shuffle, augmentation) are made: on a CUDA device itself, so
        a step never waits for the host, and on the CPU everywhere else (a CPU run's stream is what it
        always was; MPS generators are not relied on)."""
        import torch
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @property
    def cuda_graphs(self) -> bool:
        """Whether torch.compile here replays CUDA graphs (mode "reduce-overhead"): on a CUDA device."""
        return self.device.type == "cuda"

    def describe(self) -> dict:
        import torch
        return {"device": str(self.device), "precision": self.precision, "channels_last": self.channels_last,
                "torch": torch.__version__, "threads": torch.get_num_threads()}


def auto_precision(device_type: str) -> str:
    """What `--precision auto` trains at on a device of this type: bf16 where it runs natively, else fp32."""
    import torch
    return "bf16" if bf16_supported(torch.device(device_type)) else "fp32"


def resolve(device: str = "auto", precision: str = "auto", conv_model: bool = True) -> Runtime:
    dev = resolve_device(device)
    if precision not in PRECISIONS:
        raise ArgumentError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        precision = auto_precision(dev.type)
    elif precision == "bf16" and dev.type == "mps":
        raise ArgumentError("--precision bf16 is not supported on MPS here; use fp32")
    # NHWC: on a CPU at any precision (in fp32, NCHW max-pooling runs about 14x slower; conv nets train
    # 1.35 to 2x faster in NHWC, one thread: a step of 256 images took cnn 233 -> 119 ms, fast 194 -> 127,
    # best 611 -> 451), and on a GPU where bf16 uses its tensor cores.
    channels_last = conv_model and (dev.type == "cpu" or (precision == "bf16" and dev.type == "cuda"))
    return Runtime(dev, precision, channels_last)


def inference_runtime(info: dict, device: str = "auto", precision: str = "auto") -> Runtime:
    """How to run a trained model (model.json's `info`): explicit precision is honoured; "auto" keeps
    the recorded precision where the device runs it natively and falls back to fp32 where bf16 would
    only be emulated (slow; fp32 is exact enough to classify)."""
    conv = bool(info.get("architecture", {}).get("channels_last", True))
    if precision == "auto":
        recorded = info.get("precision", "fp32")
        precision = "bf16" if recorded == "bf16" and bf16_supported(resolve_device(device)) else "fp32"
    return resolve(device, precision, conv_model=conv)


# --------------------------------------------------------------------------- CPU threads

def _system_runnable() -> int:
    """Runnable threads on the whole machine (procs_running in /proc/stat), this process's included."""
    with open("/proc/stat") as f:
        return int(f.read().split("procs_running", 1)[1].split()[0])


def _own_runnable() -> int:
    """This process's runnable threads (state R); one that ends while they are read counts as not running."""
    running = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                running += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except FileNotFoundError:
            pass
    return running


def busy_cores(samples: int = 5, interval: float = 0.01) -> int | None:
    """How many of this machine's cores other processes keep busy now: the runnable threads not of
    this process, the fewest over a few samples 10 ms apart (50 ms in all), so that only work that
    holds a core throughout counts (a busy process, another training), not a thread that ran for a
    moment. None where Linux's /proc is not there to tell."""
    counts = []
    try:
        for i in range(samples):
            own = _own_runnable()
            counts.append(max(0, _system_runnable() - own))
            if i < samples - 1:
                time.sleep(interval)
    except (OSError, ValueError, IndexError):
        return None
    return min(counts)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def free_cores() -> int | None:
    """The cores other processes leave free now (busy_cores), 0 or more; None where /proc cannot tell."""
    busy = busy_cores()
    return None if busy is None else max(0, usable_cores() - busy)


def training_threads(requested: int | None) -> int:
    """The CPU threads a training run uses: the number asked for, or else the cores other processes
    leave free, at most the process's current setting (a sweep worker's share, a benchmark's
    --threads) and at least one.

    Why: torch's worker threads wait for each other at every operation, so one thread more than the
    cores free makes the whole run wait for the slowest. Beside one busy process on 2 cores, two
    threads ran `fast` several times slower than one thread did (docs/records.md)."""
    import torch
    if requested:
        return requested
    current = torch.get_num_threads()
    if current == 1:
        return 1  # nothing to lower: no need to look at the machine
    free = free_cores()
    return current if free is None else max(1, min(current, free))


# glibc's malloc thresholds, set through mallopt(3): its parameter numbers and the values set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED = {"mmap_threshold": 256 << 20, "trim_threshold": 512 << 20}
_kept_freed: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees for the next step, once per process;
    True where it was set (glibc on Linux), False elsewhere, where nothing changes.

    Why: every step allocates and frees the same activations and gradients, tens of MB each. By
    default glibc serves blocks of that size with their own mmap and returns them to the system
    when freed (or trims them off the top of its heap), so the next step takes a page fault on
    every 4 KiB it writes. The training of a `fast` run with fp32 kernels took 4.5 million such
    faults and 9 s of system time; served from a heap that is kept (blocks up to 256 MiB, up to 512
    MiB left free before any is given back), 0.37 million (first touches) and 0.7 s, and it ran a
    fifth faster (docs/records.md). The cost is that up to 512 MiB freed stays with the process;
    FASHIONLAB_KEEP_FREED_MEMORY=0 leaves malloc as it was (benchmarks/malloc_reuse.py compares)."""
    global _kept_freed
    if _kept_freed is None:
        wanted = os.environ.get("FASHIONLAB_KEEP_FREED_MEMORY", "1") != "0"
        _kept_freed = wanted and _set_malloc_thresholds()
    return _kept_freed


def glibc_malloc() -> bool:
    """Whether this process's malloc is glibc's, whose thresholds keep_freed_memory sets."""
    import platform
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _set_malloc_thresholds() -> bool:
    import ctypes
    if not glibc_malloc():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED["mmap_threshold"])
                and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED["trim_threshold"]))


def oversubscribed(threads: int) -> str | None:
    """Why `threads` pinned CPU threads are more than the cores other processes leave free now, or None
    where they fit (or Linux's /proc is not there to tell).

    Why ask: pinned threads beside a busy process wait for each other at every operation. Beside one
    `yes` on 2 cores, `fast` pinned to 2 threads took 14 times its quiet time on an Intel Xeon VM (3 to
    3.5 times on an AMD EPYC), where the one thread chosen by default took 1.7 to 2.1 times."""
    free = free_cores()
    if free is None or threads <= max(free, 1):
        return None
    cores = usable_cores()
    return (f"--threads {threads}, but other processes keep {cores - free} of this machine's {cores} cores busy "
            f"({free} free): threads beyond the free cores wait for each other at every operation, so this "
            f"run may take many times its quiet time; leave --threads unset to train on the free cores")


@contextmanager
def threads_for_training(requested: int | None):
    """torch's CPU threads set for one run (training_threads), and put back afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(training_threads(requested))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
