"""bitsandbytes only where a command needs it.

peft imports bitsandbytes whenever it is installed (to recognise 4-bit and 8-bit layers), and
bitsandbytes in turn imports torch's compiler stack: about 45 MiB of resident memory and a second
of start-up in every process, for nothing unless a model is quantized. So a training command hides
the package before its modules load (peft then sees it as absent), and once its options are
parsed, starts again with it visible if one of the models it names turns out to be quantized.

Only the training stages and the quickstart are gated (every model they load is named by an
option); other commands keep the package. Kept visible, conservatively: `--qlora`, any model
directory whose config.json (or whose adapter's base's) describes a quantization, and any model
name that is not a local directory (a hub id could be a quantized model; nothing is downloaded
here to find out). Imports no torch, so that it can run before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from rlhflab.runs import resolve_adapter_base

GATED = {"pretrain", "sft", "rm", "ppo", "dpo", "quickstart"}
QUANTIZING_OPTIONS = {"qlora", "load_in_4bit"}   # options that quantize a model on load
MODEL_OPTIONS = {"model", "policy", "reference", "reward", "reward_model", "critic", "adapter",
                 "eval_reward_model"}
# a name of the shape `owner/model` that is no local path: a hub id, possibly of a quantized model
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _quantized_directory(path: Path, depth: int = 0) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and "quantization_config" in config:
        return True
    if (path / "adapter_config.json").is_file():
        base = resolve_adapter_base(path)
        return base is not None and depth < 3 and _might_be_quantized(base, depth + 1)
    return False


def _might_be_quantized(name: str, depth: int = 0) -> bool:
    path = Path(name).expanduser()
    if path.is_dir():
        return _quantized_directory(path, depth)
    return bool(_HUB_ID.match(name)) and not path.exists()


def _values(obj):
    """(option name, value) for every field of a config, into nested dicts and lists (pipelines)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _named(field.name, getattr(obj, field.name))
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _named(str(key).replace("-", "_"), value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _values(value)


def _named(name: str, value):
    yield name, value
    if isinstance(value, (dict, list, tuple)) or dataclasses.is_dataclass(value):
        yield from _values(value)


def needs_bitsandbytes(command: str, config) -> bool:
    """Whether this command, with this config, may load or write a quantized model."""
    if command not in GATED:
        return True
    for name, value in _values(config):
        if name in QUANTIZING_OPTIONS and value not in (False, None, "false", "False", 0):
            return True
        if name in MODEL_OPTIONS and isinstance(value, str) and value and _might_be_quantized(value):
            return True
    return False


KEEP = "RLHFLAB_KEEP_BITSANDBYTES"   # set by restart_with_bitsandbytes (or a user): never hide it


def hide_bitsandbytes(command: str, argv: list[str]) -> bool:
    """At the start of a gated command's process, before its modules (and peft) load: hide
    bitsandbytes, unless the command line asks for 4-bit outright. True when hidden. Whether the
    command's full config needs it is only known after its options are parsed, which loads the
    stage's module: needs_bitsandbytes then says, and restart_with_bitsandbytes starts again."""
    if (command not in GATED or os.environ.get(KEEP) or "bitsandbytes" in sys.modules or "peft" in sys.modules
            or any(arg.split("=")[0].lstrip("-").replace("-", "_") in QUANTIZING_OPTIONS
                   for arg in argv if arg.startswith("--"))):
        return False
    sys.modules["bitsandbytes"] = None   # for the import machinery: not installed
    return True


def restart_with_bitsandbytes() -> None:
    """Run this process's command line again (exec, same pid) with bitsandbytes visible: a model
    it names turned out to be quantized after hide_bitsandbytes had hidden the package."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, KEEP: "1"})
