"""`rlhflab <stage> [--config file.yaml] [--option value ...]`.

Thin by design: parse the stage's config, call the stage. The option list of every stage comes
from its config dataclass (rlhflab/config.py), so `--help`, YAML keys and validation agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import warnings

from rlhflab import config as cfg
from rlhflab.errors import NonFiniteError, UsageError
from rlhflab.memory import loaded_torch, restart_for_memory_reuse
from rlhflab.models.bitsandbytes_gate import hide_bitsandbytes, needs_bitsandbytes, restart_with_bitsandbytes
from rlhflab.runs import release_outputs

# command -> (config class path, function path, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": ("rlhflab.cli.quickstart:QuickstartConfig", "rlhflab.cli.quickstart:run", "the whole recipe on the toy world"),
    "sft": ("rlhflab.config:SFTConfig", "rlhflab.train.sft:run", "supervised fine-tuning (InstructGPT step 1)"),
    "pretrain": ("rlhflab.config:PretrainConfig", "rlhflab.train.pretrain:run", "next-token pretraining on raw text"),
    "merge": ("rlhflab.config:MergeConfig", "rlhflab.models.loading:merge_command", "merge a LoRA adapter into its base"),
    "tokenizer train": ("rlhflab.config:TokenizerTrainConfig", "rlhflab.cli.tools:tokenizer_train", "train a byte-level BPE tokenizer"),
    "world export": ("rlhflab.config:WorldExportConfig", "rlhflab.cli.tools:world_export", "write the toy world's data files"),
    "rm": ("rlhflab.train.rm:RMConfig", "rlhflab.train.rm:run", "reward model from preference pairs or K-way rankings"),
    "rm score": ("rlhflab.evals.audit:ScoreConfig", "rlhflab.evals.audit:score_command", "score a file of responses with a reward model"),
    "rm export": ("rlhflab.rewards.model:ExportConfig", "rlhflab.rewards.model:export_command", "write a reward model as a Hugging Face sequence classifier"),
    "rm audit": ("rlhflab.evals.audit:AuditConfig", "rlhflab.evals.audit:run", "check a reward model for reward hacks"),
    "ppo": ("rlhflab.train.rl:RLConfig", "rlhflab.train.rl:run", "RL against a reward model: PPO, GRPO, RLOO, REINFORCE++"),
    "dpo": ("rlhflab.train.dpo:DPOConfig", "rlhflab.train.dpo:run", "DPO and its variants (ipo, cdpo, simpo, rpo), offline or in online rounds"),
    "sample": ("rlhflab.feedback.preferences:SampleConfig", "rlhflab.feedback.preferences:sample_command", "sample K answers per prompt from a model"),
    "rank": ("rlhflab.feedback.preferences:RankConfig", "rlhflab.feedback.preferences:rank_command", "rank sampled answers into pairs or rankings (judge, reward model or AI labeller)"),
    "critique": ("rlhflab.feedback.critique:CritiqueConfig", "rlhflab.feedback.critique:run", "Constitutional AI: answer, critique and revise; write SFT data and DPO pairs"),
    "chat": ("rlhflab.infer.chat:ChatConfig", "rlhflab.infer.chat:run", "talk to a model, an adapter or a run's best policy"),
    "serve": ("rlhflab.infer.server:ServeConfig", "rlhflab.infer.server:run", "OpenAI-compatible API and chat page for a model and its adapters"),
    "serve export": ("rlhflab.infer.convlog:ServeExportConfig", "rlhflab.infer.convlog:export_command", "write a serving log's prompts and preference votes as training files"),
    "quantize": ("rlhflab.infer.quantize:QuantizeConfig", "rlhflab.infer.quantize:quantize_command", "write a model with 4-bit (NF4) or 8-bit weights"),
    "report": ("rlhflab.evals.report:ReportConfig", "rlhflab.evals.report:run", "one self-contained HTML page of a run"),
    "eval": ("rlhflab.evals.evaluate:EvalConfig", "rlhflab.evals.evaluate:run", "compare models: gold, RM score, win rate, length, diversity, KL"),
    "run": ("rlhflab.cli.pipeline:PipelineConfig", "rlhflab.cli.pipeline:run", "run a pipeline of stages from a YAML file"),
    "judge": ("rlhflab.config:JudgeConfig", "rlhflab.evals.judge:judge", "score answers with the toy world's gold judge"),
    "label init": ("rlhflab.feedback.label_commands:LabelInitConfig", "rlhflab.feedback.label_commands:init_command", "create a labeling database from task files"),
    "label add-annotator": ("rlhflab.feedback.label_commands:AddAnnotatorConfig", "rlhflab.feedback.label_commands:add_annotator_command", "create an annotator and print their token"),
    "label serve": ("rlhflab.feedback.label_server:LabelServeConfig", "rlhflab.feedback.label_server:run", "the web app where people rank answers"),
    "label export": ("rlhflab.feedback.label_commands:LabelExportConfig", "rlhflab.feedback.label_commands:export_command", "write labels as rankings, pairs and rule flags"),
    "label simulate": ("rlhflab.feedback.label_simulate:SimulateConfig", "rlhflab.feedback.label_simulate:simulate_command", "label a running server with the toy world's simulated annotators"),
}

# Commands that start again under glibc settings that reuse freed tensor memory: measured on PPO
# (peak RSS down by a fifth, no slower); not yet shown to cost nothing elsewhere.
REUSE_MEMORY = {"ppo"}

# Commands whose first bare argument is an option's value: `rlhflab chat runs/quickstart`.
POSITIONAL = {"chat": "--model", "report": "--run-dir", "run": "--pipeline", "serve": "--model",
              "quantize": "--model", "label add-annotator": "--name"}


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _help_text(f) -> str:
    text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if "(default" not in text and default not in (None, ""):   # a help that names its default says it once
        text += f" (default: {default})"
    return text.replace("%", "%%")


# Shared option groups: a stage's --help lists its own options first, then these.
SHARED_GROUPS = {cfg.ModelOptions: "model options", cfg.DataOptions: "data options",
                 cfg.TrainOptions: "training options"}
# Options that name a file or directory (or a hub id), shown as PATH; any other text is TEXT.
PATH_OPTIONS = {"model", "tokenizer", "data", "eval_data", "out", "prompts", "reference", "responses", "ptx_data",
                "eval_reward_model", "reward_model", "baseline", "db", "log_db", "judgments", "policy", "reward",
                "run_dir", "pipeline", "resume", "init_config", "corpus", "gold", "tasks", "constitution",
                "guidelines", "adapter", "config"}


def _metavar(f, base_type) -> str:
    """What an option takes, as --help shows it: INT, FLOAT, PATH, a {choice,...} list or TEXT."""
    choices = f.metadata.get("choices")
    if choices:
        return "{" + ",".join(str(c) for c in choices if c is not None) + "}"
    if base_type is int:
        return "INT"
    if base_type is float:
        return "FLOAT"
    return "PATH" if f.name in PATH_OPTIONS else "TEXT"


def build_parser(command: str, config_cls) -> argparse.ArgumentParser:
    description = COMMANDS[command][2] if command in COMMANDS else ""
    parser = argparse.ArgumentParser(
        prog=f"rlhflab {command}", description=description, allow_abbrev=False,
        usage=f"rlhflab {command} [--config PATH] [--option VALUE ...]",
    )
    parser.add_argument("--config", metavar="PATH", help="YAML file of options (command-line options override it)")
    types_ = cfg._resolved_types(config_cls)
    old_names = {alias.to: old for old, alias in getattr(config_cls, "deprecated_aliases", {}).items()}
    shared = {f.name: title for group, title in SHARED_GROUPS.items() if issubclass(config_cls, group)
              for f in cfg.fields_of(group)}
    groups = {title: parser.add_argument_group(title) for title in dict.fromkeys(shared.values())}
    own = [f for f in cfg.fields_of(config_cls) if f.name not in shared]
    for f in own + [f for f in cfg.fields_of(config_cls) if f.name in shared]:
        base_type = cfg._base_type(types_[f.name])
        is_bool = base_type is bool
        old = old_names.get(f.name)
        help_ = _help_text(f) + (f" (old name, deprecated: --{old.replace('_', '-')})" if old else "")
        where = groups[shared[f.name]] if f.name in shared else parser
        _add_option(where, f.name, is_bool, help_, _metavar(f, base_type))
        if old:   # its own dest, so that cfg.renamed sees it was used
            _add_option(where, old, is_bool, argparse.SUPPRESS)
    return parser


def _add_option(parser, name: str, is_bool: bool, help_: str, metavar: str = "VALUE") -> None:
    flag = "--" + name.replace("_", "-")
    if is_bool:
        # `--lora`, `--lora true|false` and `--no-lora` all work.
        parser.add_argument(flag, dest=name, nargs="?", const="true", default=argparse.SUPPRESS,
                            metavar="BOOL", help=help_)
        parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const",
                            const="false", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    else:
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=metavar, action="append",
                            help=help_)


def parse(command: str, argv: list[str], where: str = "on the command line"):
    """Parse a stage's options into its config; UsageError on anything unknown or invalid.
    `where` says in errors where the options were given."""
    config_cls = _load(COMMANDS[command][0])
    parser = build_parser(command, config_cls)
    known, unknown = parser.parse_known_args(_negative_values_attached(argv))
    if unknown:
        valid = ["--" + f.name.replace("_", "-") for f in cfg.fields_of(config_cls)] + ["--config"]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        flag = bad.split("=")[0]
        if flag.startswith("-"):
            raise UsageError(f"unknown option {flag} for `rlhflab {command}`" + cfg.suggest(flag, valid))
        raise UsageError(f"unexpected argument {bad!r} for `rlhflab {command}` (options look like --name value)")
    cli_values = vars(known)
    fields = {f.name: f for f in cfg.fields_of(config_cls)}
    aliases = getattr(config_cls, "deprecated_aliases", {})
    dests = {**fields, **{old: fields[alias.to] for old, alias in aliases.items()}}
    for dest, f in dests.items():
        values = cli_values.get(dest)
        if isinstance(values, list):  # non-bool options are collected with action="append"
            # A repeatable option accumulates; any other takes its last value (so scripts can override).
            cli_values[dest] = ",".join(values) if f.metadata.get("repeatable") else values[-1]
    yaml_path = cli_values.pop("config", None)
    yaml_values = cfg.load_yaml(yaml_path) if yaml_path else {}
    return cfg.build(config_cls, yaml_values, cli_values, yaml_path, where)


def _negative_values_attached(argv: list[str]) -> list[str]:
    """`--opt -inf` as `--opt=-inf`: argparse takes a value that starts with "-" and is not a plain
    negative number for an option, so the range check could not name the option and its range."""
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: rlhflab <command> [--config file.yaml] [--option value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {COMMANDS[name][2]}" for name in COMMANDS]
    lines += ["", "`rlhflab <command> --help` lists every option with its default."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # peft asks transformers for a deprecated attribute on every adapter load; the notice is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    process_entry = argv is None   # the command line, not a call from Python code
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if process_entry and command in REUSE_MEMORY:   # before torch loads (memory.memory_reuse_environment)
        restart_for_memory_reuse()
    # Sub-sub-commands (`rlhflab world export`, `rlhflab rm audit`) are registered as "world export".
    if rest and f"{command} {rest[0]}" in COMMANDS:
        command, rest = f"{command} {rest[0]}", rest[1:]
    if rest and command in POSITIONAL and not rest[0].startswith("-"):
        rest = [POSITIONAL[command], rest[0], *rest[1:]]
    hidden = process_entry and hide_bitsandbytes(command, rest)
    if command not in COMMANDS:
        print(f"rlhflab: unknown command {command!r}" + cfg.suggest(command, list(COMMANDS)), file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    try:
        config = parse(command, rest)
        if hidden and needs_bitsandbytes(command, config):
            restart_with_bitsandbytes()
        result = _load(COMMANDS[command][1])(config)
    except UsageError as exc:
        print(f"rlhflab {command}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"rlhflab {command}: stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        resumable = "resume" in {f.name for f in cfg.fields_of(_load(COMMANDS[command][0]))}
        print(f"\nrlhflab {command}: interrupted" + ("; the last checkpoint is intact (resume with --resume auto)"
                                                     if resumable else ""), file=sys.stderr)
        return 130
    finally:
        release_outputs()   # the --out directories this command locked
        if process_entry:
            close_process_group()
    return result if isinstance(result, int) else 0


def close_process_group() -> None:
    """End this process's part of a multi-process run (torchrun, accelerate launch) before it exits.
    A process group left open is torn down by static destructors while its communication threads
    still run: the process can then abort ("terminate called without an active exception") while
    the other processes are finishing. Only at process exit: a pipeline's stages share the group."""
    torch = loaded_torch()
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    try:
        torch.distributed.destroy_process_group()
    except (RuntimeError, ValueError) as exc:   # exiting anyway: say so, never fail the command for it
        print(f"rlhflab: note: could not close the process group: {exc}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
