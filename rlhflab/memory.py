"""This process's memory: the glibc settings under which freed tensor memory is reused or given
back, and the peak resident (and CUDA) memory a stage reports in its summary."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def loaded_torch():
    """torch if something has imported it, else None (never imported here or in runs.py: a tensor
    or CUDA memory to report means it has, and `rlhflab --help` and option checks start fast)."""
    return sys.modules.get("torch")


# glibc settings under which freed tensor memory is reused (see memory_reuse_environment)
REUSE_TUNABLES = ("glibc.malloc.tcache_count=0", "glibc.malloc.mxfast=0")


def memory_reuse_environment(environ) -> dict | None:
    """A copy of `environ` whose GLIBC_TUNABLES turn off glibc's caches of small freed blocks, or
    None when there is nothing to change.

    torch allocates every tensor with posix_memalign, which in glibc (before 2.38) cuts the block
    out of a slightly larger free one and frees the small pieces left over around it. glibc's
    per-thread cache (tcache) and its fast bins hold such scraps without merging them with their
    free neighbours, so each one splits the memory of a freed activation: the next tensor of the
    same shape no longer fits where its predecessor was, and the heap grows instead. Measured on a
    LoRA PPO step in bench/RESULTS.md: peak RSS 1686 -> 1365 MiB, and no slower. With both
    caches off the scraps merge back at once. Tunables are read when a process starts, hence
    restart_for_memory_reuse. None off Linux/glibc, when GLIBC_TUNABLES already names either
    setting (the user's value wins, e.g. glibc.malloc.tcache_count=7 keeps glibc's default)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (ValueError, OSError, AttributeError):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if any(tunable.split("=")[0] in current for tunable in REUSE_TUNABLES):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [current, *REUSE_TUNABLES]))
    return env


def restart_for_memory_reuse() -> None:
    """Run this process's command line again in the same process (exec, same pid) with
    memory_reuse_environment's settings, unless they are in effect already. Call it first thing,
    before torch is imported: nothing done before it survives."""
    env = memory_reuse_environment(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


M_MMAP_THRESHOLD = -3      # glibc mallopt parameter
RELEASE_THRESHOLD = 128 * 1024


def release_freed_memory() -> bool:
    """Make glibc return freed tensor memory to the system instead of keeping it for reuse.

    glibc serves allocations above a threshold with mmap and gives them back on free, but it
    raises that threshold each time such a block is freed, so after a few training steps every
    activation comes from the heap, where freed blocks stay mapped and fragment: the peak RSS
    grows well past what is alive at any moment (measured in bench/RESULTS.md). Fixing the
    threshold at glibc's initial 128 KiB keeps RSS close to live memory, at the price of fresh
    zeroed pages for every large tensor (slower steps). The default's reuse of freed memory
    (memory_reuse_environment) gets part of the way at no cost; this goes the rest, at that price.
    Returns False where this is not glibc, or when the user set MALLOC_MMAP_THRESHOLD_ themselves
    (theirs wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD))
    except (OSError, AttributeError):
        return False


def reset_peak_memory() -> None:
    """Start counting peak memory afresh, so that a stage run in the same process as others (a
    pipeline, the quickstart) reports its own peak, not the largest of the stages before it. On
    Linux this resets the peak resident set (VmHWM); elsewhere the process's peak stays."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    torch = loaded_torch()
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _peak_rss_since_reset_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory() -> dict:
    """Peak resident memory of this process since reset_peak_memory (and peak CUDA memory when
    used), in MiB."""
    rss_kb = _peak_rss_since_reset_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss_kb / (1024 * 1024) if sys.platform == "darwin" else rss_kb / 1024
    out = {"peak_rss_mib": round(rss_mib, 1)}
    torch = loaded_torch()
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
