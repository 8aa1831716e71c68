"""`rlhflab run pipeline.yaml`: a user's own pipeline, with the quickstart's machinery.

A pipeline file names an output directory and an ordered list of stages. Each stage is an
ordinary rlhflab command with its options; `{name}` in an option's value is replaced by the
directory of the earlier stage called `name`, so later stages can start from earlier ones:

    out: runs/qwen-hc3
    stages:
      - name: sft
        command: sft
        options: {model: Qwen/Qwen2.5-0.5B, data: hc3.jsonl, lora: true}
      - name: rm
        command: rm
        options: {model: "{sft}", data: pairs.jsonl, lora: true}

Every stage's options are validated before the first one runs. Training stages, and the commands
that write a directory (world export, tokenizer train, rm export, merge), write to OUT/NAME unless
given an out; "{name}" is that directory. A training stage whose directory holds a summary.json is
skipped, and one that was interrupted resumes from its last checkpoint. Other commands run each time.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhflab import config as cfg
from rlhflab.cli.main import COMMANDS, _load, main, parse
from rlhflab.config import opt
from rlhflab.errors import UsageError


@dataclass
class PipelineConfig:
    """Run a pipeline of stages described in a YAML file."""

    stage = "run"
    pipeline: str | None = opt(None, "the pipeline YAML file (also accepted as the first argument)")
    dry_run: bool = opt(False, "validate every stage and print the commands, run nothing")
    only: str | None = opt(None, "run only these stages (comma-separated names)")


@dataclass
class Stage:
    name: str
    command: str
    argv: list[str]
    out: Path | None
    trains: bool
    options: dict       # the stage's resolved options, as its config.yaml records them


_REFERENCE = re.compile(r"\{([A-Za-z0-9_-]+)\}")


# Commands that write a directory but do not train: they get OUT/NAME too, and run every time.
DIRECTORY_COMMANDS = ("world export", "tokenizer train", "rm export", "merge")


def load_pipeline(path: str) -> list[Stage]:
    """Parse and validate a pipeline file; every stage's options are checked by its own config."""

    data = cfg.load_yaml(path, "the pipeline")
    unknown = sorted(set(data) - {"out", "stages"})
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r} (a pipeline has 'out' and 'stages')")
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        raise UsageError(f"{path}: 'stages' must be a non-empty list")
    root = Path(str(data.get("out") or Path("runs") / Path(path).stem))
    stages, dirs = [], {}
    for i, entry in enumerate(data["stages"], 1):
        where = f"{path}: stage {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("command"), str):
            raise UsageError(f"{where}: expected a mapping with 'command' (and 'name', 'options')")
        extra = sorted(set(entry) - {"name", "command", "options"})
        if extra:
            raise UsageError(f"{where}: unknown key {extra[0]!r} (a stage has 'name', 'command', 'options')")
        command = entry["command"]
        if command not in COMMANDS or command in ("quickstart", "run"):
            runnable = [c for c in COMMANDS if c not in ("quickstart", "run")]
            raise UsageError(f"{where}: unknown command {command!r}" + cfg.suggest(command, runnable))
        name = str(entry.get("name") or command.replace(" ", "-"))
        if name in dirs:
            raise UsageError(f"{where}: a stage called {name!r} exists already; give each a distinct 'name'")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise UsageError(f"{where} ({name}): 'options' must be a mapping of option: value")
        argv = []
        fields = {f.name: f for f in cfg.fields_of(_config_class(command))}
        for key, value in options.items():
            field_ = fields.get(str(key).replace("-", "_"))
            if isinstance(value, list) and field_ is not None and not field_.metadata.get("repeatable"):
                raise UsageError(f"{where} ({name}), option {key}: takes one value, got a list")
            argv += [f"--{str(key).replace('_', '-')}", _resolve(value, dirs, f"{where} ({name}), option {key}")]
        trains = "resume" in {f.name for f in cfg.fields_of(_config_class(command))}
        writes_directory = trains or command in DIRECTORY_COMMANDS
        given = next((argv[j + 1] for j in range(0, len(argv), 2) if argv[j] == "--out"), None)
        out = Path(given) if given else root / name if writes_directory else None
        if writes_directory and given is None:
            argv += ["--out", str(out)]
        if trains and "resume" not in options:
            argv += ["--resume", "auto"]
        try:
            options = cfg.to_dict(parse(command, argv, "in the pipeline"))
        except UsageError as exc:
            raise UsageError(f"{where} ({name}): {exc}") from None
        dirs[name] = out
        stages.append(Stage(name, command, argv, out, trains, options))
    return stages


def _changes(stage: Stage) -> str:
    """A note naming the options a finished stage ran with that this file now sets otherwise."""

    try:
        ran = yaml.safe_load((stage.out / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return ""
    changed = sorted(k for k, v in stage.options.items() if k not in ("resume", "progress") and k in ran and ran[k] != v)
    if not changed:
        return ""
    return (f"; note: it ran with other {', '.join('--' + k.replace('_', '-') for k in changed)} than this file "
            f"gives; delete {stage.out} to run it again")


def _config_class(command: str):
    return _load(COMMANDS[command][0])


def _resolve(value, dirs: dict[str, Path | None], where: str) -> str:
    if isinstance(value, (list, tuple)):   # a repeatable option's values, as repeating it would give
        return ",".join(_resolve(v, dirs, where) for v in value)
    text = str(value).lower() if isinstance(value, bool) else str(value)

    def replace(match: re.Match) -> str:
        if match.group(1) not in dirs:
            raise UsageError(f"{where}: {{{match.group(1)}}} names no earlier stage (earlier: "
                             f"{', '.join(dirs) or 'none'})")
        if dirs[match.group(1)] is None:
            raise UsageError(f"{where}: {{{match.group(1)}}} names a stage that writes no directory of its "
                             "own; give that stage an 'out' option and name the path")
        return str(dirs[match.group(1)])

    return _REFERENCE.sub(replace, text)


def run(config: PipelineConfig) -> int:
    if not config.pipeline:
        raise UsageError("give the pipeline file: rlhflab run pipeline.yaml")
    stages = load_pipeline(config.pipeline)
    wanted = {s.strip() for s in config.only.split(",")} if config.only else None
    if wanted:
        missing = wanted - {s.name for s in stages}
        if missing:
            raise UsageError(f"--only: no stage called {', '.join(sorted(missing))}")
    for stage in stages:
        if wanted and stage.name not in wanted:
            continue
        line = f"rlhflab {stage.command} " + " ".join(stage.argv)
        if config.dry_run:
            print(line)
            continue
        if stage.trains and (stage.out / "summary.json").exists():
            print(f"== {stage.name}: done already ({stage.out}), skipped{_changes(stage)}", file=sys.stderr)
            continue
        print(f"== {stage.name}: {line}", file=sys.stderr)
        code = main([*stage.command.split(), *stage.argv])
        if code != 0:
            print(f"run: stage {stage.name} failed (exit {code}); fix it and run the same command again to "
                  "continue from here", file=sys.stderr)
            return code
    return 0
