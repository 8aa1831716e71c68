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
skipped, and one that was interrupted resumes from its last checkpoint. Other commands run each
time, unless their stage names a `done` file that exists already.

A recipe can be parameterised: `params` gives named values with their defaults, `${name}` in an
option's value is replaced by one, `presets` names sets of values (`--preset NAME`) and `--set
name=value` overrides any. `training_defaults` are options every training stage gets unless it
sets its own. A bare name such as `toy-world` is one of the recipes packaged with rlhflab
(rlhflab/recipes/); the quickstart runs `toy-world`.

A recipe can start from another one's stages: `extends: {recipe: toy-world, stages: [world, sft]}`
runs those stages of toy-world first (in its order, with its options), then the file's own; the
parameters, presets and training defaults are toy-world's, overridden by the file's.
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
    preset: str | None = opt(None, "one of the file's presets: a named set of parameter values")
    set: str | None = opt(None, "override a parameter: --set name=value (repeatable)", repeatable=True)
    out: str | None = opt(None, "directory for the whole run (default: the file's 'out')")


@dataclass
class Stage:
    name: str
    command: str
    argv: list[str]
    out: Path | None
    trains: bool
    options: dict       # the stage's resolved options, as its config.yaml records them
    done: Path | None = None   # a file whose existence means the stage has finished


_REFERENCE = re.compile(r"\{([A-Za-z0-9_-]+)\}")
_PARAMETER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PIPELINE_KEYS = {"out", "params", "presets", "training_defaults", "stages", "extends"}


def find_pipeline(name: str) -> str:
    """A pipeline file's path: `name` itself, or the packaged recipe of that name."""
    if Path(name).exists() or "/" in name or name.endswith((".yaml", ".yml")):
        return name
    packaged = RECIPES / f"{name}.yaml"
    if packaged.is_file():
        return str(packaged)
    known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    raise UsageError(f"no pipeline file {name!r}, and no packaged recipe of that name (packaged: {', '.join(known)})")


def read_pipeline(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A pipeline file's contents, with the stages, parameters, presets and training defaults of
    the recipe it `extends` merged in (the file's own values win)."""
    data = cfg.load_yaml(path, "the pipeline")
    base = data.get("extends")
    if base is None:
        return data
    if (not isinstance(base, dict) or not isinstance(base.get("recipe"), str) or not isinstance(base.get("stages"), list)
            or set(base) - {"recipe", "stages"}):
        raise UsageError(f"{path}: 'extends' must be {{recipe: NAME, stages: [names of its stages to run first]}}")
    parent_path = find_pipeline(base["recipe"])
    if Path(parent_path).resolve() in [Path(p).resolve() for p in (*seen, path)]:
        raise UsageError(f"{path}: 'extends' goes round in a circle through {parent_path}")
    parent = read_pipeline(parent_path, (*seen, path))
    named = {str(s.get("name") or s.get("command", "").replace(" ", "-")): s
             for s in parent.get("stages") or [] if isinstance(s, dict)}
    for name in base["stages"]:
        if name not in named:
            raise UsageError(f"{path}: extends: {parent_path} has no stage {name!r} (its stages: {', '.join(named)})")
    merged = {key: _merged(parent, data, key, path) for key in ("params", "training_defaults")}
    parent_presets, own_presets = (_merged({}, d, "presets", path) for d in (parent, data))
    merged["presets"] = {name: _merged(parent_presets, own_presets, name, path)   # a preset's values, merged too
                         for name in {**parent_presets, **own_presets}}
    merged["stages"] = [s for name, s in named.items() if name in base["stages"]] + list(data.get("stages") or [])
    merged["out"] = data.get("out", parent.get("out"))
    return merged


def _merged(parent: dict, data: dict, key: str, path: str) -> dict:
    values = [d.get(key) or {} for d in (parent, data)]
    if not all(isinstance(v, dict) for v in values):
        raise UsageError(f"{path}: '{key}' must be a mapping (here or in the recipe it extends)")
    return {**values[0], **values[1]}


def pipeline_params(path: str, preset: str | None = None, overrides: dict | None = None) -> dict:
    """The file's parameters: its defaults < the preset's values < `overrides`; names are checked."""
    data = read_pipeline(path)
    params = data.get("params") or {}
    presets = data.get("presets") or {}
    if not isinstance(params, dict) or not isinstance(presets, dict):
        raise UsageError(f"{path}: 'params' and 'presets' must be mappings")
    values = dict(params)
    if preset is not None:
        if preset not in presets:
            raise UsageError(f"--preset {preset}: {path} has no such preset (presets: {', '.join(presets) or 'none'})")
        values.update(_known(presets[preset], params, f"{path}: preset {preset}"))
    values.update(_known(overrides or {}, params, "--set"))
    return values


def _known(values, params: dict, where: str) -> dict:
    if not isinstance(values, dict):
        raise UsageError(f"{where}: expected a mapping of parameter: value")
    for name in values:
        if name not in params:
            raise UsageError(f"{where}: unknown parameter {name!r}" + cfg.suggest(str(name), list(params)))
    return values


def parse_settings(text: str | None) -> dict:
    """--set a=1,b=2 (the repeated option's values, joined) -> {"a": "1", "b": "2"}."""
    settings = {}
    for item in filter(None, (text or "").split(",")):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--set {item}: expected name=value")
        settings[name.strip()] = value.strip()
    return settings


# Commands that write a directory but do not train: they get OUT/NAME too, and run every time.
DIRECTORY_COMMANDS = ("world export", "tokenizer train", "rm export", "merge")


def load_pipeline(path: str, preset: str | None = None, overrides: dict | None = None,
                  out: str | None = None) -> list[Stage]:
    """Parse and validate a pipeline file; every stage's options are checked by its own config."""
    data = read_pipeline(path)
    unknown = sorted(set(data) - PIPELINE_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r} (a pipeline has {', '.join(sorted(PIPELINE_KEYS))})")
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        raise UsageError(f"{path}: 'stages' must be a non-empty list")
    params = pipeline_params(path, preset, overrides)
    defaults = data.get("training_defaults") or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"{path}: 'training_defaults' must be a mapping of option: value")
    root = Path(out or str(data.get("out") or Path("runs") / Path(path).stem))
    stages, dirs = [], {}
    for i, entry in enumerate(data["stages"], 1):
        where = f"{path}: stage {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("command"), str):
            raise UsageError(f"{where}: expected a mapping with 'command' (and 'name', 'options')")
        extra = sorted(set(entry) - {"name", "command", "options", "done"})
        if extra:
            raise UsageError(f"{where}: unknown key {extra[0]!r} (a stage has 'name', 'command', 'options', 'done')")
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
        trains = "resume" in fields
        if trains:
            options = {**{k: v for k, v in defaults.items() if str(k).replace("-", "_") in fields}, **options}
        for key, value in options.items():
            value = _substitute(value, params, f"{where} ({name}), option {key}")
            field_ = fields.get(str(key).replace("-", "_"))
            if isinstance(value, list) and field_ is not None and not field_.metadata.get("repeatable"):
                raise UsageError(f"{where} ({name}), option {key}: takes one value, got a list")
            argv += [f"--{str(key).replace('_', '-')}", _resolve(value, dirs, f"{where} ({name}), option {key}")]
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
        done = out / "summary.json" if trains else None
        if "done" in entry:
            where_done = f"{where} ({name}), done"
            done = Path(_resolve(_substitute(entry["done"], params, where_done), dirs, where_done))
        stages.append(Stage(name, command, argv, out, trains, options, done))
    return stages


def _substitute(value, params: dict, where: str):
    """${name} -> the parameter's value; a value that is just ${name} keeps the parameter's type."""
    if isinstance(value, (list, tuple)):
        return [_substitute(v, params, where) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(1) not in params:
            raise UsageError(f"{where}: ${{{match.group(1)}}} is no parameter of this file"
                             + cfg.suggest(match.group(1), list(params)))
        found = params[match.group(1)]
        return str(found).lower() if isinstance(found, bool) else str(found)

    whole = _PARAMETER.fullmatch(value)
    if whole and whole.group(1) in params:
        return params[whole.group(1)]
    return _PARAMETER.sub(replace, value)


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
        raise UsageError("give the pipeline file: rlhflab run pipeline.yaml (or a packaged recipe: toy-world)")
    stages = load_pipeline(find_pipeline(config.pipeline), config.preset, parse_settings(config.set), config.out)
    return run_stages(stages, config.only, config.dry_run)


def run_stages(stages: list[Stage], only: str | None = None, dry_run: bool = False) -> int:
    """Run the stages in order, skipping finished ones; the exit code of the first that fails."""
    wanted = {s.strip() for s in only.split(",")} if only else None
    if wanted:
        missing = wanted - {s.name for s in stages}
        if missing:
            raise UsageError(f"--only: no stage called {', '.join(sorted(missing))}")
    for stage in stages:
        if wanted and stage.name not in wanted:
            continue
        line = f"rlhflab {stage.command} " + " ".join(stage.argv)
        if dry_run:
            print(line)
            continue
        if stage.done is not None and stage.done.exists():
            note = _changes(stage) if stage.trains else ""
            print(f"== {stage.name}: done already ({stage.done.parent}), skipped{note}", file=sys.stderr)
            continue
        print(f"== {stage.name}: {line}", file=sys.stderr)
        code = main([*stage.command.split(), *stage.argv])
        if code != 0:
            print(f"run: stage {stage.name} failed (exit {code}); fix it and run the same command again to "
                  "continue from here", file=sys.stderr)
            return code
    return 0
