"""Stage configs: one dataclass per stage, filled from defaults < YAML file < command line.

Every field carries its help text and, where the values are a closed set, its choices, so the
`--help` listing, the YAML keys and the validation all come from one place. Bad input raises
UsageError naming the option (and the closest valid name, for a typo); nothing is rewritten
silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhflab.errors import UsageError
from rlhflab.runs import atomic_write_text, read_text


def opt(default, help: str, choices: Collection | None = None, repeatable: bool = False,
        range: Range | None = None):
    """A config field with its help text (and allowed values: a tuple, or a table whose keys are
    read each time, as --estimator's losses.ESTIMATORS). A repeatable option may be given several
    times on the command line; its values are joined with commas. A number's valid range is
    RANGES[name] unless `range` gives this field its own."""
    meta = {"help": help, "choices": choices, "repeatable": repeatable, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: finite numbers from `low` to `high` (either end may be
    open, or infinite: no bound)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def show(x):
            return f"{x:g}" if isinstance(x, float) else str(x)
        if self.high == math.inf and self.low == -math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"{'greater than' if self.low_open else 'at least'} {show(self.low)}"
        return (f"in {'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}"
                f"{')' if self.high_open else ']'}")


AT_LEAST_0, AT_LEAST_1, ABOVE_0, FRACTION = Range(0), Range(1), Range(0, low_open=True), Range(0, 1, high_open=True)
UNIT = Range(0, 1)

# Every numeric option's valid values, by name (the same name means the same thing in every
# command); a field may declare its own with opt(range=...). validate() checks them all before any
# work, and refuses NaN and inf everywhere. tests/test_guards.py checks that no numeric option lacks one.
RANGES: dict[str, Range] = {
    # counts and sizes
    **dict.fromkeys(("batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha", "log_every",
                     "keep_checkpoints", "max_new_tokens", "alarm_window", "kl_horizon", "max_nonfinite",
                     "mini_batch", "n_samples", "ppo_epochs", "rollout_prompts", "round_prompts", "rounds",
                     "critique_tokens", "default_max_tokens", "max_batch_size", "max_body_kb", "max_queue", "k"),
                    AT_LEAST_1),
    **dict.fromkeys(("max_steps", "eval_every", "save_every", "max_rows", "harden_kinds", "min_new_tokens",
                     "probe_every", "samples", "principles_per_pair", "batch_wait_ms", "rankings", "comparisons"), AT_LEAST_0),
    "seed": Range(0, 2**32 - 1),
    "port": Range(0, 65535),
    "vocab_size": Range(300),
    # optimisation
    **dict.fromkeys(("lr", "critic_lr", "weight_decay", "max_grad_norm", "epochs"), AT_LEAST_0),
    **dict.fromkeys(("warmup_ratio", "eval_fraction", "lora_dropout"), FRACTION),
    # losses and their weights
    **dict.fromkeys(("margin", "center_coef", "harden_weight", "rpo_alpha", "simpo_gamma", "kl_coef", "kl_target",
                     "entropy_coef", "vf_coef", "ptx_coef", "value_clip", "reward_clip", "missing_eos_penalty",
                     "target_kl_stop"), AT_LEAST_0),
    "beta": ABOVE_0,
    "clip_eps": ABOVE_0,
    "label_smoothing": Range(0, 0.5),
    "gamma": UNIT,
    "lam": UNIT,
    "habit_rate": UNIT,
    "warn_chosen_drop": Range(),
    "rule_penalty": AT_LEAST_0,
    "rule_threshold": UNIT,
    # sampling
    "temperature": AT_LEAST_0,
    "top_p": Range(0, 1, low_open=True),
    # labelling
    **dict.fromkeys(("overlap", "min_annotators", "annotators"), AT_LEAST_1),
    **dict.fromkeys(("gold_every", "tasks_per_annotator", "spread"), AT_LEAST_0),
    "lease_minutes": ABOVE_0,
    "flag_error": UNIT,
}


def value_range(cls, name: str) -> Range | None:
    """A numeric option's valid range (its own, or RANGES'), None if it has none."""
    f = next(f for f in fields_of(cls) if f.name == name)
    return f.metadata.get("range") or RANGES.get(name)


@dataclass(frozen=True)
class Renamed:
    """An option's old name, still accepted with a one-line deprecation note on stderr. A config
    class lists its own: `deprecated_aliases = {"judge_rm": Renamed("eval_reward_model")}`."""

    to: str                                     # the field it sets now
    value: Callable[[str], str] | None = None   # a value written the old way -> the new option's


# ---------------------------------------------------------------------------------------------
# Shared option groups (plain dataclass inheritance; each stage adds its own fields).

# --compile, in the training stages and the commands that generate (models/compiled.py).
COMPILE_HELP = ("compile the model's transformer blocks with torch.compile (on the CPU: needs a C++ compiler); a "
                "model that cannot compile runs uncompiled, with a note. auto: only where it was measured faster "
                "(docs/scale-out.md)")


@dataclass
class ModelOptions:
    model: str | None = opt(None, "model: a local directory (HF model or peft adapter) or a hub id")
    tokenizer: str | None = opt(None, "tokenizer directory or hub id (default: the model's)")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")
    device: str = opt("auto", "where to train: auto picks CUDA when present", ("auto", "cpu", "cuda"))
    dtype: str = opt(
        "auto", "weights dtype: auto = bf16 on CUDA that supports it, else fp32",
        ("auto", "fp32", "bf16", "fp16"),
    )
    lora: bool = opt(False, "train a LoRA adapter instead of all weights; on an adapter directory, keep training "
                            "that adapter (its own rank and targets)")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input")
    lora_target: str = opt("all-linear", "modules that get adapters: all-linear or comma-separated names")
    qlora: bool = opt(False, "with --lora: hold the frozen base in 4-bit NF4 (QLoRA; needs the bitsandbytes "
                             "package, CUDA or CPU)")
    chat_template: str = opt(
        "auto", "auto: the tokenizer's own template, or rlhflab's ChatML default when it has none",
        ("auto", "default"),
    )

    @property
    def lora_targets(self) -> str | list[str]:
        """--lora-target as peft takes it: "all-linear", or a list of module names."""
        if self.lora_target == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.lora_target.split(",")]

    def check_model_options(self) -> None:
        if self.qlora and not self.lora:
            raise UsageError("--qlora trains a LoRA adapter on a 4-bit base: give --lora with it")
        if self.lora_targets != "all-linear" and not all(self.lora_targets):
            raise UsageError(f"--lora-target {self.lora_target!r}: expected all-linear or comma-separated module "
                             "names, e.g. q_proj,v_proj")


@dataclass
class DataOptions:
    data: str | None = opt(None, "training data: .jsonl/.json/.parquet file, save_to_disk dir or hub name")
    format: str = opt(
        "auto", "data format (auto detects it from the fields)",
        ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "hc3", "pairs",
         "rankings", "prompts", "text"),
    )
    hc3_answers: str = opt("chatgpt", "hc3 format: which answers to train on", ("chatgpt", "human", "both"))
    columns: str | None = opt(None, "read the data's own column names as the format's fields: FIELD=COLUMN,... "
                                    "e.g. prompt=question,chosen=good,rejected=bad")
    eval_data: str | None = opt(None, "held-out data file (default: a split of --data)")
    eval_fraction: float = opt(0.05, "share of --data held out for evaluation when --eval-data is absent: a "
                                     "seeded draw of max(1, int(rows x fraction)) rows, none with 0 (pretrain: blocks)")
    max_rows: int = opt(0, "use at most this many rows of --data (0 = all)")
    skip_bad_rows: bool = opt(False, "skip malformed rows (counted in summary.json) instead of failing")
    max_length: int = opt(512, "longest sequence in tokens; longer rows are truncated (and counted)")


@dataclass
class TrainOptions:
    out: str | None = opt(None, "stage directory (default: runs/<run>/<stage>)")
    run: str = opt("default", "run name, used for the default output directory runs/<run>/<stage>")
    seed: int = opt(0, "random seed for initialisation, data order and dropout")
    epochs: float = opt(1.0, "passes over the training data (ignored when --max-steps > 0)")
    max_steps: int = opt(0, "optimizer steps to run (0 = derive from --epochs)")
    batch_size: int = opt(8, "rows per micro-batch, counted over all processes (each takes its share); "
                             "a step trains on --batch-size x --grad-accum rows")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.03, "share of steps spent warming the learning rate up linearly")
    scheduler: str = opt("cosine", "learning-rate decay after warmup", ("cosine", "linear", "constant"))
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    gradient_checkpointing: bool = opt(
        False, "recompute each layer's activations in the backward pass: far less memory, about a third more compute"
    )
    release_memory: bool = opt(
        False, "give freed memory back to the system at once (Linux/glibc): a lower peak RSS on the CPU than the "
               "default's reuse of freed memory, slower steps"
    )
    compile: str = opt("auto", COMPILE_HELP, ("false", "true", "auto"))
    group_by_length: bool = opt(True, "batch rows of similar length together to cut padding")
    log_every: int = opt(10, "log metrics every N optimizer steps")
    eval_every: int = opt(0, "evaluate every N steps (0 = only at the end)")
    save_every: int = opt(0, "write a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep")
    resume: str | None = opt(None, "resume: 'auto' (latest checkpoint in the stage dir), a checkpoint path, or "
                                   "'never' (start again over an earlier run's checkpoints; without --resume "
                                   "such a directory is refused)")
    report_to: str = opt("none", "where to send metrics besides metrics.jsonl", ("none", "tensorboard", "wandb"))
    wandb_project: str = opt("rlhflab", "--report-to wandb: the wandb project")
    wandb_name: str | None = opt(None, "--report-to wandb: the run's name in wandb (default: RUN/STAGE)")
    progress: bool = opt(True, "show progress bars")


# ---------------------------------------------------------------------------------------------
# Stage configs.


@dataclass
class SFTConfig(ModelOptions, DataOptions, TrainOptions):
    """Supervised fine-tuning: next-token loss on assistant turns only."""

    stage = "sft"
    init_config: str | None = opt(
        None, "build a fresh, randomly initialised model from this config.json (or a preset name)"
    )


@dataclass
class PretrainConfig(ModelOptions, DataOptions, TrainOptions):
    """Next-token prediction on raw text packed into fixed blocks."""

    stage = "pretrain"
    init_config: str | None = opt(
        None, "build a fresh, randomly initialised model from this config.json (or a preset name)"
    )
    preset: str | None = opt(None, "fresh Llama of a named size (tiny ~2M, small ~8M parameters)", (None, "tiny", "small"))
    text_field: str = opt("text", "field holding the text in .jsonl input")
    samples: int = opt(3, "greedy continuations written to summary.json at the end")


@dataclass
class MergeConfig:
    """Merge a LoRA adapter into its base model and save a plain HF model directory."""

    stage = "merge"
    adapter: str | None = opt(None, "adapter directory written by a LoRA stage")
    out: str | None = opt(None, "output directory for the merged model")
    dtype: str = opt("auto", "dtype of the saved weights", ("auto", "fp32", "bf16", "fp16"))
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")


# ---------------------------------------------------------------------------------------------
# Parsing and validation.


def fields_of(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _base_type(tp):
    """int | None -> int; keeps the type used to convert strings."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def _resolved_types(cls) -> dict:
    return typing.get_type_hints(cls)


def convert(cls, name: str, value, where: str):
    """Turn a YAML/CLI value into the field's type; raise UsageError naming the option."""
    tp = _base_type(_resolved_types(cls)[name])
    flag = "--" + name.replace("_", "-")
    repeatable = next(f for f in fields_of(cls) if f.name == name).metadata.get("repeatable")
    if isinstance(value, (list, tuple)):   # YAML lists: a repeatable option's values, joined as on the command line
        if not repeatable:
            raise UsageError(f"{flag} ({where}): takes one value, got a list")
        value = ",".join(str(v) for v in value)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and tp is not str):
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        return str(value).lower() if isinstance(value, bool) else str(value)   # YAML's true/false
    except (TypeError, ValueError):
        raise UsageError(
            f"{flag} ({where}): expected {tp.__name__}, got {value!r}"
        ) from None


def suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_yaml(path: str, option: str = "--config") -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option}: file not found: {path}")
    try:
        data = yaml.safe_load(read_text(p))
    except yaml.YAMLError as exc:
        raise UsageError(f"{option} {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{option} {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def build(cls, yaml_values: dict, cli_values: dict, yaml_path: str | None = None,
          where: str = "on the command line"):
    """Defaults < YAML < CLI, converted and validated."""
    names = [f.name for f in fields_of(cls)]
    values = {}
    yaml_values = renamed(cls, yaml_values, f"in {yaml_path}")
    cli_values = renamed(cls, cli_values, where)
    for key, value in yaml_values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UsageError(
                f"{yaml_path}: unknown key {key!r} for `rlhflab {cls.stage}`"
                + suggest(name, names)
            )
        values[name] = convert(cls, name, value, f"in {yaml_path}")
    for name, value in cli_values.items():
        values[name] = convert(cls, name, value, where)
    config = cls(**values)
    validate(config)
    return config


def renamed(cls, given: dict, where: str) -> dict:
    """`given` (option name -> value) with each of the class's deprecated aliases replaced by the
    option it is now, and a one-line note on stderr for each."""
    aliases = getattr(cls, "deprecated_aliases", {})
    out = {}
    for key, value in given.items():
        alias = aliases.get(str(key).replace("-", "_"))
        if alias is None:
            out[key] = value
            continue
        old, new = "--" + str(key).replace("_", "-"), "--" + alias.to.replace("_", "-")
        if any(str(k).replace("-", "_") == alias.to for k in given):
            raise UsageError(f"{old} ({where}) is the old name of {new}: give only {new}")
        now = alias.value(value) if alias.value is not None and isinstance(value, str) else value
        print(f"note: {old} is deprecated; use {new}" + (f" ({old} {value} is {new} {now})" if now != value else ""),
              file=sys.stderr)
        out[alias.to] = now
    return out


def validate(config) -> None:
    """Closed sets and ranges, in one place."""
    for f in fields_of(type(config)):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            raise UsageError(f"--{f.name.replace('_', '-')}: {value!r} is not one of: {shown}")
    for f in fields_of(type(config)):   # every number: finite and in its range
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        valid = value_range(type(config), f.name) or Range()
        if value not in valid:
            finite = "" if math.isfinite(value) else "a finite number "
            raise UsageError(f"--{f.name.replace('_', '-')}: must be {finite}{valid}, got {value}")
    if isinstance(config, ModelOptions):
        config.check_model_options()
    check = getattr(config, "check", None)
    if check:
        check()


def require(config, *names: str) -> None:
    """For a command's check(): a UsageError naming the first of the options `names` left empty."""
    for name in names:
        if not getattr(config, name):
            raise UsageError(f"give --{name.replace('_', '-')}")


def to_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in fields_of(type(config))}


def save(config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))


@dataclass
class TokenizerTrainConfig:
    """Train a byte-level BPE tokenizer (with pad, EOS and chat markers) on text files."""

    stage = "tokenizer"
    corpus: str | None = opt(None, "comma-separated .txt/.jsonl files to learn from")
    vocab_size: int = opt(4096, "vocabulary size, special tokens included")
    out: str | None = opt(None, "output directory (loadable with AutoTokenizer.from_pretrained)")
    text_field: str = opt("text", "field holding the text in .jsonl input")


@dataclass
class WorldExportConfig:
    """Write the toy world's data files (corpus, SFT, preferences, prompts, held-out prompts)."""

    stage = "world"
    out: str | None = opt(None, "output directory")
    seed: int = opt(0, "world seed: the same seed writes the same files")
    size: str = opt("default", "how much data", ("small", "default"))
    world: str = opt("default", "which world: default (habits SFT copies and RLHF must fix; preference candidates "
                                "share their content and differ in behaviour), habits (the earlier world with two "
                                "habits), classic (the habit-free world)", ("default", "habits", "classic"))
    habit_rate: float = opt(0.6, "how often the demonstrator falls into each of its habits (0 = independent flaws "
                                 "only)")
    habits: str | None = opt(None, "override the world's habits, comma-separated, from comply, wrong_language, "
                                   "filler, refuse (over-refusing benign requests), or none")
    constitution: str | None = opt(None, "also write feedback.jsonl, demonstrations of critiques, revisions and "
                                         "comparisons under this constitution ('toy', or a file using its principle "
                                         "names), to train the toy world's feedback model (docs/rlaif.md)")
    comparisons: int = opt(0, "with --constitution: comparison lessons in feedback.jsonl (the labeller's); 0 = 8 "
                              "per SFT demonstration (24000 for the default size)")
    rankings: int = opt(0, "ranked prompts in rankings.jsonl (and so prefs.jsonl, rules.jsonl); 0 = the world's "
                           "own: 6000 for the default world, 1500 for the others (400 and 100 at --size small)")


@dataclass
class JudgeConfig:
    """Score responses with the toy world's gold judge (a file of responses, or a model's answers)."""

    stage = "judge"
    responses: str | None = opt(None, "JSONL of {messages, response[, meta]} to score")
    model: str | None = opt(None, "model directory (or adapter) to generate answers with")
    prompts: str | None = opt(None, "prompts JSONL (e.g. eval_prompts.jsonl) for --model")
    max_new_tokens: int = opt(64, "longest answer generated per prompt")
    batch_size: int = opt(32, "prompts generated at once")
    out: str | None = opt(None, "write the scored responses here (JSONL)")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")
    device: str = opt("auto", "where to run", ("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "weights dtype", ("auto", "fp32", "bf16", "fp16"))
