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

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

from rlhflab.errors import UsageError
from rlhflab.memory import loaded_torch

try:
    import fcntl
except ImportError:   # not a POSIX system: no output locks
    fcntl = None


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


# ---------------------------------------------------------------------------------------------
# Text files: UTF-8 (a byte-order mark is accepted); anything else is named with file and line.


def text_lines(path: str | Path):
    """Yield (line number, text) of a UTF-8 file, one line at a time. A UTF-8 byte-order mark (as
    Windows editors and Excel write) is dropped; UTF-16 or Latin-1 bytes raise UsageError naming
    the file and line."""
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield number, _decoded(raw, path, number)


def read_text(path: str | Path) -> str:
    """A whole UTF-8 file as text, with text_lines' rules."""
    return "".join(line for _, line in text_lines(path))


def _decoded(raw: bytes, path, number: int) -> str:
    if (number == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff"))) or b"\x00" in raw:
        raise UsageError(f"{path}:{number}: UTF-16 text (or NUL bytes); rlhflab reads UTF-8: save the file as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}; "
                         "Latin-1 or another legacy encoding?); save the file as UTF-8") from None


# ---------------------------------------------------------------------------------------------
# What a command reads and where it writes: --out never replaces an input, one writer at a time.

LOCK_NAME = ".rlhflab.lock"
STAGE_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")   # what marks a stage directory
NOT_INPUTS = ("out", "run", "resume")
_locks: dict[Path, tuple[int, bool]] = {}   # locked directory -> (descriptor, whether this process made it)


def input_paths(config) -> list[tuple[str, Path]]:
    """(option, path) of every existing file or directory a config names as input: any string
    option whose value (or one of its comma-separated values, `name=path` included) exists, and
    the base model of an adapter directory among them."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        if f.name in NOT_INPUTS or not isinstance(value, str) or value in (f.metadata.get("choices") or ()):
            continue
        flag = "--" + f.name.replace("_", "-")
        for piece in (p.strip() for p in value.split(",")):
            if "=" in piece and not Path(piece).exists():
                piece = piece.split("=", 1)[1]
            if not piece or not Path(piece).exists():
                continue
            found.append((flag, Path(piece)))
            base = _adapter_base(Path(piece))
            if base is not None:
                found.append((f"the base model of {flag}", base))
    return found


def _adapter_base(path: Path) -> Path | None:
    base = resolve_adapter_base(path)
    return Path(base) if base and Path(base).exists() else None


def refuse_overwriting_inputs(out: str | Path, inputs: list[tuple[str, Path]], option: str = "--out",
                              directory: bool = True) -> None:
    """UsageError when `out` is one of `inputs`, lies inside one, or (a directory) holds one."""
    here = Path(out).resolve()
    for name, path in inputs:
        there = path.resolve()
        if here == there or there in here.parents or (directory and here in there.parents):
            how = "the same path as" if here == there else "inside" if there in here.parents else "a directory holding"
            raise UsageError(f"{option} {out}: {how} {name} {path}, which this command reads; writing there "
                             f"could replace it: choose another {'directory' if directory else 'file'}")


def check_stage_directory(out: Path, config) -> None:
    """A training stage's --out, before any work: not a file, not an input nor around one, and
    new, empty or an earlier stage's output (one holding config.yaml, metrics or checkpoints)."""
    refuse_a_file(out)
    refuse_overwriting_inputs(out, input_paths(config))
    if out.is_dir() and not any((out / name).exists() for name in STAGE_FILES) \
            and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise UsageError(f"--out {out}: a directory with other files in it (not the output of an earlier run); "
                         "choose a new or empty directory")


def lock_output(out: Path, option: str = "--out") -> None:
    """Take `out` for this process: a second rlhflab process on the same directory is refused
    while this one runs. The lock is the kernel's (flock), so a killed process leaves none behind."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if fcntl is None or key in _locks:
        return
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(f"{option} {out}: another rlhflab process is writing there now; wait for it to finish, "
                         "or choose another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _locks[key] = (fd, made)


def release_outputs() -> None:
    """Release every directory this process locked; one it made and left empty is removed."""
    for key, (fd, made) in list(_locks.items()):
        if made and {p.name for p in key.iterdir()} == {LOCK_NAME}:
            (key / LOCK_NAME).unlink(missing_ok=True)
            key.rmdir()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        del _locks[key]


# ---------------------------------------------------------------------------------------------
# Weight files: checked before a library opens them, so a broken file is named, not a traceback.

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def check_safetensors(path: str | Path, option: str) -> None:
    """UsageError naming `path` unless it is a whole safetensors file: an 8-byte header length, a
    JSON header, and every tensor's bytes present (a truncated, empty or garbage file fails)."""
    path = Path(path)
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or size < 8:
            problem = f"{size} bytes, too short for a header"
        elif length > size - 8 or length > 100_000_000:
            problem = f"its header claims {length} bytes, the file holds {size - 8} after the length"
        else:
            try:
                header = json.loads(handle.read(length).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                header = None
            if not isinstance(header, dict):
                problem = "the header is not a JSON object"
            else:
                problem = _tensor_problem(header, size - 8 - length)
    if problem:
        raise UsageError(f"{option}: {path} is not a complete safetensors file ({problem}); it may be truncated "
                         "or damaged: write it again")


def _tensor_problem(header: dict, data_bytes: int) -> str | None:
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            need = math.prod(entry["shape"]) * DTYPE_BYTES.get(entry["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has no valid dtype, shape and data_offsets"
        if not (0 <= start <= stop) or (need and stop - start != need):
            return f"tensor {name!r} has inconsistent offsets"
        end = max(end, stop)
    if end > data_bytes:
        return f"its tensors need {end} bytes of data, the file holds {data_bytes}"
    return None


def check_weight_files(directory: str | Path, option: str) -> None:
    """Every *.safetensors file in a model, adapter or checkpoint directory (check_safetensors)."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors(path, option)


def _jsonable(value):
    torch = loaded_torch()
    if torch is not None and isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def stage_dir(config) -> Path:
    return Path(config.out) if config.out else Path("runs") / config.run / config.stage


class MetricsLog:
    """Appends one JSON line per logged step; optionally mirrors to tensorboard/wandb via accelerate.
    Only the main process writes (under `accelerate launch` every process logs the same step)."""

    def __init__(self, path: Path, accelerator=None, resume_step: int = 0):
        self.path = path
        self.accelerator = accelerator
        self.writes = accelerator is None or accelerator.is_main_process
        if not self.writes:
            return
        if resume_step and path.exists():
            # Drop lines past the checkpoint we resume from, so the log reads like one run.
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()

    def log(self, step: int, metrics: dict) -> None:
        if not self.writes:
            return
        row = {"step": step, **{k: _round(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numeric, step=step)


def _round(value):
    torch = loaded_torch()
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


NEVER = "never"   # --resume never: start again over an earlier run's checkpoints


def find_resume(out: Path, resume: str | None) -> Path | None:
    """`--resume auto` -> the latest complete checkpoint (or None); a path -> that checkpoint;
    `never` -> None. Without --resume, a directory holding checkpoints is an error that says how
    to choose, never a silent restart over them. The checkpoint is checked whole before use."""

    if resume == NEVER:
        return None
    if not resume:
        found = checkpoint_dirs(out)
        if found:
            raise UsageError(f"--out {out} holds checkpoints of an earlier run (the latest: {found[-1].name}): give "
                             f"--resume auto to continue it, or --resume {NEVER} to start again from scratch "
                             "(its checkpoints and metrics are then replaced)")
        return None
    if resume == "auto":
        found = checkpoint_dirs(out)
        path = found[-1] if found else None
    else:
        path = Path(resume)
        if not (path / "trainer_state.json").exists():
            raise UsageError(f"--resume: {resume} is not a checkpoint directory (no trainer_state.json)")
    if path is not None:
        check_checkpoint(path)
    return path


def check_checkpoint(path: Path) -> None:
    """A checkpoint to resume from, before anything is written: its state file and weights whole."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UsageError(f"--resume: {path}/trainer_state.json is damaged (not a JSON object with a step); "
                         "resume from another checkpoint")
    check_weight_files(path, "--resume")
    if not any(path.glob("*.safetensors")) or any(path.glob("model*.bin")):
        raise UsageError(f"--resume: {path} holds no safetensors weights, or pickled ones (model*.bin) that "
                         "rlhflab does not read; resume from another checkpoint")


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


# ---------------------------------------------------------------------------------------------
# An adapter's base model: recorded as the user named it, found again after the run moves.

BASE_RECORD = "base_model.json"


def record_adapter_base(adapter_dir: str | Path, base_name: str) -> None:
    """Write the base model into an adapter directory: adapter_config.json keeps the name as given
    (what peft and transformers read), and base_model.json adds where it lies from the adapter and
    its absolute path, so that a run directory moved or copied as a whole still finds its base."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / "adapter_config.json"
    adapter = json.loads(path.read_text(encoding="utf-8"))
    adapter["base_model_name_or_path"] = base_name
    atomic_write_text(path, json.dumps(adapter, indent=2))
    record = {"given": base_name}
    if Path(base_name).exists():
        record["from_adapter"] = os.path.relpath(Path(base_name).resolve(), adapter_dir.resolve())
        record["absolute"] = str(Path(base_name).resolve())
    atomic_write_json(adapter_dir / BASE_RECORD, record)


def resolve_adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model of an adapter directory: where base_model.json says it lies from the adapter,
    else the name as given (from the working directory, or a hub id), else its absolute path.
    None when adapter_config.json names none."""
    adapter_dir = Path(adapter_dir)
    try:
        given = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(given, str) or not given:
        return None
    try:
        record = json.loads((adapter_dir / BASE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or record.get("given") != given:
        record = {}   # written by another tool, or the base was renamed by hand: the name rules
    relative = record.get("from_adapter")
    if isinstance(relative, str) and (adapter_dir / relative).exists():
        return os.path.normpath(adapter_dir / relative)
    if Path(given).exists() or not isinstance(record.get("absolute"), str) or not Path(record["absolute"]).exists():
        return given
    return record["absolute"]
