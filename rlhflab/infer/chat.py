"""`rlhflab chat MODEL_OR_RUN_DIR`: talk to a policy in the terminal, answers streamed as they are generated.

The argument is a model directory, a LoRA adapter (merged onto its recorded base on load), or a run
directory such as runs/quickstart/, where the best finished policy is chosen by the run's own
evaluation (results.json or eval/figures.json: the gold score, else the win rate against the
baseline, else the reward model's score); a run not yet evaluated falls back to the order ppo,
grpo, dpo, sft, pretrain. The line printed first says which policy was chosen, and why. The conversation is kept as chat messages and rendered through the
tokenizer's chat template every turn, exactly as training and evaluation render it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rlhflab.config import COMPILE_HELP, opt
from rlhflab.data.template import encode_prompt, stop_token_ids
from rlhflab.errors import UsageError
from rlhflab.infer import engine
from rlhflab.infer.engine import SamplingParams
from rlhflab.models.compiled import GENERATE, compile_model
from rlhflab.models.loading import choose_placement, context_limit, load_causal_lm, load_tokenizer, resize_for_tokenizer
from rlhflab.rewards.model import is_reward_model

# Stages of a run directory whose output is a policy, best first.
POLICY_STAGES = ("ppo", "grpo", "dpo", "sft", "pretrain")

HELP = """commands:
  /reset          forget the conversation
  /system TEXT    set the system message (and forget the conversation); /system alone removes it
  /help           this list
  /exit           quit (so does Ctrl-D)
"""


@dataclass
class ChatConfig:
    """Chat with a model, an adapter, or the best finished policy of a run directory."""

    stage = "chat"
    model: str | None = opt(None, "model directory, LoRA adapter, or run directory (its best finished policy)")
    system: str | None = opt(None, "system message at the start of the conversation")
    max_new_tokens: int = opt(256, "longest answer in tokens")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_p: float = opt(0.9, "nucleus sampling: keep the smallest set of tokens with this much probability")
    device: str = opt("auto", "where to run", ("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "weights dtype", ("auto", "fp32", "bf16", "fp16"))
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")
    seed: int = opt(0, "sampling seed (turn k uses seed + k, so a replayed session answers the same)")
    compile: str = opt("auto", COMPILE_HELP, ("false", "true", "auto"))


# ---------------------------------------------------------------------------------------------
# Which model to load.


def _holds_model(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def resolve_model(name: str) -> tuple[str, str]:
    """(what to load, a line saying what was chosen). Local paths are checked here, hub ids are not."""
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_hub_id(name):
            return name, f"chatting with {name} (hub id)"
        raise UsageError(f"{name}: no such file or directory")

    if is_reward_model(str(path)):
        raise UsageError(f"{name} is a reward model: it scores answers but does not write them; "
                         "chat with a policy instead (the sft, ppo or dpo directory of the run)")
    if _holds_model(path):
        return str(path), f"chatting with {path}"
    return _best_policy(path)


def _looks_like_hub_id(name: str) -> bool:
    # "org/model" whose first part is not a local directory; anything else is meant as a path.
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(parts[0]).exists()


# How a run's evaluation ranks its policies, first found first: (figure, what it is called).
RANK_BY = (("gold", "gold score"), ("win_rate", "win rate against the baseline"), ("rm_score", "reward-model score"))
EVAL_FILES = ("results.json", "eval/figures.json")


def _finished_policy(stage_dir: Path) -> bool:
    return ((stage_dir / "summary.json").is_file() and _holds_model(stage_dir)
            and not is_reward_model(str(stage_dir)))


def _figure(model: dict, key: str):
    value = model.get("vs_baseline", {}).get(key) if key == "win_rate" and isinstance(
        model.get("vs_baseline"), dict) else model.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _ranked_by_eval(run_dir: Path) -> tuple[str, str] | None:
    """The finished policy the run's evaluation scores highest, with a line saying so; None when
    the run has no evaluation of its policies."""
    for name in EVAL_FILES:
        path = run_dir / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        models = data.get("models", data) if isinstance(data, dict) else None
        if not isinstance(models, dict):
            continue
        stages = {model: run_dir / ("pretrain" if model == "base" else model) for model in models}
        stages = {model: stage for model, stage in stages.items()
                  if isinstance(models[model], dict) and _finished_policy(stage)}
        for key, label in RANK_BY:
            scores = {m: _figure(models[m], key) for m in stages if _figure(models[m], key) is not None}
            if not scores:
                continue
            best = max(scores, key=scores.__getitem__)
            others = ", ".join(f"{m} {v:.3f}" for m, v in sorted(scores.items(), key=lambda kv: -kv[1]) if m != best)
            return str(stages[best]), (f"chatting with {stages[best]} (the {best} policy: the best {label} in "
                                       f"{path}, {scores[best]:.3f}" + (f"; then {others}" if others else "") + ")")
    return None


def _best_policy(run_dir: Path) -> tuple[str, str]:
    ranked = _ranked_by_eval(run_dir)
    if ranked is not None:
        return ranked
    unfinished = []
    for stage in POLICY_STAGES:
        stage_dir = run_dir / stage
        if not stage_dir.is_dir():
            continue
        if (stage_dir / "summary.json").is_file() and _holds_model(stage_dir):
            skipped = f"; not finished, so skipped: {', '.join(unfinished)}" if unfinished else ""
            return str(stage_dir), (f"chatting with {stage_dir} (the {stage} policy: {run_dir} has no evaluation "
                                    f"to rank its policies by, so the first finished of {', '.join(POLICY_STAGES)}"
                                    f"{skipped})")
        unfinished.append(stage)
    if unfinished:
        raise UsageError(f"{run_dir}: no finished policy yet: no summary.json (or no model) in "
                         f"{', '.join(unfinished)}; finish a stage (run it again with --resume auto) or give a model")
    raise UsageError(f"{run_dir} is neither a model (config.json), an adapter (adapter_config.json) nor a "
                     f"run directory with a finished {', '.join(POLICY_STAGES)} stage")


def load(name: str, config: ChatConfig):
    placement = choose_placement(config.device, config.dtype)
    model = load_causal_lm(name, placement, config.trust_remote_code, option="--model").eval()
    tokenizer = load_tokenizer(name, config.trust_remote_code)
    # A hub model without a chat template gets rlhflab's markers as new tokens.
    resize_for_tokenizer(model, tokenizer)
    compile_model(model, config.compile, GENERATE, "the model", train=False, generates=True)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# The conversation.


def sampling_params(config: ChatConfig, tokenizer, turn: int):
    return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                          do_sample=config.temperature > 0, stop_token_ids=tuple(stop_token_ids(tokenizer)),
                          seed=config.seed + turn)


def fit_context(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], int, bool]:
    """Drop the oldest exchanges until the prompt fits `budget` tokens.

    Returns (messages, exchanges dropped, whether it fits); the last user message is never cut.
    """

    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(encode_prompt(tokenizer, system + turns)) > budget:
        if len(turns) == 1:
            return system + turns, dropped, False
        turns = turns[2:]  # a user message and the answer to it
        dropped += 1
    return system + turns, dropped, True


def answer(model, tokenizer, messages: list[dict], params, write: Callable[[str], None]) -> str:
    """Generate one answer, writing its text as it is produced; returns the whole answer."""

    generation = engine.generate_text(model, tokenizer, [messages], params, on_text=write)
    return generation.texts[0]


def fresh_history(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def chat_loop(model, tokenizer, config: ChatConfig, read_line: Callable[[str], str | None],
              write: Callable[[str], None]) -> list[dict]:
    """Read lines until /exit or end of input; returns the conversation as it stood at the end.

    read_line(prompt) returns a line, or None at end of input; write(text) shows text at once.
    """

    system = config.system
    history = fresh_history(system)
    limit = context_limit(model)
    if limit and config.max_new_tokens > limit // 2:   # else no room is left for what the user says
        write(f"(the model's context holds {limit} tokens: answers are kept to {limit // 2} of them, "
              f"not --max-new-tokens {config.max_new_tokens})\n")
        config = replace(config, max_new_tokens=limit // 2)
    turn = 0
    while True:
        line = read_line("you> ")
        if line is None:
            write("\n")
            return history
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/exit", "/quit"):
                return history
            if command == "/reset":
                history = fresh_history(system)
                write("(conversation cleared)\n")
            elif command == "/system":
                system = argument.strip() or None
                history = fresh_history(system)
                write(f"(system message set: {system}; conversation cleared)\n" if system
                      else "(system message removed; conversation cleared)\n")
            elif command == "/help":
                write(HELP)
            else:
                write(f"unknown command {command}\n{HELP}")
            continue

        messages = history + [{"role": "user", "content": text}]
        if limit:
            messages, dropped, fits = fit_context(tokenizer, messages, limit - config.max_new_tokens)
            if not fits:
                write(f"(too long: the model's context holds {limit} tokens, and --max-new-tokens "
                      f"{config.max_new_tokens} of them are kept for the answer; nothing was sent)\n")
                continue
            if dropped:
                write(f"(the model's context holds {limit} tokens: the oldest {dropped} exchange(s) were dropped)\n")
        params = sampling_params(config, tokenizer, turn)
        turn += 1
        write("assistant> ")
        try:
            reply = answer(model, tokenizer, messages, params, write)
        except KeyboardInterrupt:
            # Ctrl-C stops this answer, not the session; the unanswered message is forgotten.
            write("\n(interrupted)\n")
            continue
        write("\n")
        history = messages + [{"role": "assistant", "content": reply}]


# ---------------------------------------------------------------------------------------------
# The command.


def read_stdin(prompt: str) -> str | None:
    try:
        line = input(prompt)
    except EOFError:
        return None
    if not sys.stdin.isatty():
        # Piped input is not echoed by a terminal; echo it so the transcript reads as a conversation.
        print(line, flush=True)
    return line


def write_stdout(text: str) -> None:
    print(text, end="", flush=True)


def run(config: ChatConfig) -> int:
    if not config.model:
        raise UsageError("give a model: `rlhflab chat DIR` or --model DIR (a model, an adapter, or a run "
                         "directory like runs/quickstart)")
    name, chosen = resolve_model(config.model)
    print(chosen, file=sys.stderr)
    model, tokenizer = load(name, config)
    for stream in (sys.stdin, sys.stdout):
        # A terminal whose encoding cannot show a character should get a placeholder, not a crash.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    print("type /help for commands, /exit or Ctrl-D to quit", file=sys.stderr)
    try:
        chat_loop(model, tokenizer, config, read_stdin, write_stdout)
    except KeyboardInterrupt:
        print()
    return 0
