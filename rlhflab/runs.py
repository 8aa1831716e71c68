"""Stage directories, metrics, summaries and atomic checkpoints.

A stage writes `runs/<run>/<stage>/`:
    config.yaml      the resolved options
    metrics.jsonl    one JSON line per logged step
    summary.json     final figures; written last, so its presence means the stage finished
    checkpoints/     step-N/ directories, each complete before it gets its name
    (the model)      HF model or peft adapter files plus the tokenizer

Checkpoints are written to a hidden temporary directory and renamed into place: a process killed
mid-save leaves the previous checkpoint untouched and usable.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rlhflab.errors import UsageError


def _torch():
    """torch if something has imported it, else None. A tensor or CUDA memory to report means it
    has; this module leaves it unimported so that `rlhflab --help` and option checks start fast."""
    return sys.modules.get("torch")


def _umask() -> int:
    """The process's umask: what open() and mkdir() take off 0666 / 0777 (mkstemp and mkdtemp
    ignore it and make 0600 / 0700, which other users of a shared machine cannot read)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def readable_as_usual(directory: Path) -> None:
    """Give every file under `directory` the mode open() would have (libraries that save through
    mkstemp, safetensors among them, leave weights readable by their owner only)."""
    mode = 0o666 & ~_umask()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600 != mode:
            os.chmod(path, mode)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())   # others may read what we write, as with any other file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> None:
    """One JSON object per line (UTF-8, unescaped), written atomically."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def refuse_a_file(out: str | Path) -> None:
    """An --out that must be a directory and is a file is an error (before anything is written)."""

    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out}: a file; expected a directory to write into")


def refuse_a_directory(out: str | Path, option: str = "--out") -> None:
    """An --out that must be a file and is a directory is an error (before any work is done)."""

    if Path(out).is_dir():
        raise UsageError(f"{option} {out}: a directory; expected the path of a file to write")


def check_output_directory(out: str | Path, source: str | Path, marker: str) -> Path:
    """`out` as a directory a command may (re)write: new, empty, or an earlier output of the same
    command (one holding `marker`); never the `source` it is made from, nor anything around it, nor
    another directory's files. Called before any work, and again just before writing."""

    out = Path(out)
    here, there = out.resolve(), Path(source).resolve()
    if here == there or there in here.parents or here in there.parents:
        raise UsageError(f"--out {out}: would overwrite {source}, which it is made from; choose another directory")
    refuse_a_file(out)
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise UsageError(f"--out {out}: a directory with other files in it; choose a new or empty directory")
    return out


def atomic_write_directory(out: str | Path, fill, source: str | Path, marker: str) -> Path:
    """Write a whole directory: `fill(tmp)` writes into a hidden sibling, which then takes the
    place of `out`. A failure part-way leaves `out` as it was and no half-written directory.

    `out` may only replace an earlier output of the same command (check_output_directory)."""
    out = check_output_directory(out, source, marker)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        readable_as_usual(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _jsonable(value):
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def stage_dir(config) -> Path:
    return Path(config.out) if config.out else Path("runs") / config.run / config.stage


M_MMAP_THRESHOLD = -3      # glibc mallopt parameter
RELEASE_THRESHOLD = 128 * 1024


def release_freed_memory() -> bool:
    """Make glibc return freed tensor memory to the system instead of keeping it for reuse.

    glibc serves allocations above a threshold with mmap and gives them back on free, but it
    raises that threshold each time such a block is freed, so after a few training steps every
    activation comes from the heap, where freed blocks stay mapped and fragment: the peak RSS
    grows well past what is alive at any moment (measured in bench/RESULTS.md). Fixing the
    threshold at glibc's initial 128 KiB keeps RSS close to live memory, at the price of fresh
    zeroed pages for every large tensor (slower steps). Returns False where this is not glibc,
    or when the user set MALLOC_MMAP_THRESHOLD_ themselves (theirs wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD))
    except (OSError, AttributeError):
        return False


def peak_memory() -> dict:
    """Peak resident memory of this process (and peak CUDA memory when used), in MiB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss_kb / (1024 * 1024) if sys.platform == "darwin" else rss_kb / 1024
    out = {"peak_rss_mib": round(rss_mib, 1)}
    torch = _torch()
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


class MetricsLog:
    """Appends one JSON line per logged step; optionally mirrors to tensorboard/wandb via accelerate."""

    def __init__(self, path: Path, accelerator=None, resume_step: int = 0):
        self.path = path
        self.accelerator = accelerator
        if resume_step and path.exists():
            # Drop lines past the checkpoint we resume from, so the log reads like one run.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numeric, step=step)


def _round(value):
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Timer:
    """Wall time and throughput of the training loop (model loading excluded)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume(out: Path, resume: str | None) -> Path | None:
    """`--resume auto` -> the latest complete checkpoint (or None); a path -> that checkpoint."""

    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").exists():
        raise UsageError(f"--resume: {resume} is not a checkpoint directory (no trainer_state.json)")
    return path


def save_checkpoint(out: Path, step: int, write, state: dict, keep: int) -> Path:
    """Write a checkpoint atomically: `write(tmp_dir)` fills it, then it is renamed into place."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step}-"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        write(tmp)
        atomic_write_json(tmp / "trainer_state.json", {"step": step, **state})
        readable_as_usual(tmp)   # a run that crashes later leaves this checkpoint as its output
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))


def clean_stale_tmp(out: Path) -> None:
    """Remove half-written checkpoints left by a killed process."""
    root = out / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
