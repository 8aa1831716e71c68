"""The four roles of RLHF — policy, reference, critic, reward — and their forward passes.

LoRA mode keeps ONE copy of the base weights. Every role is a peft adapter
on it, switched per forward pass:
    policy     trainable adapter named "default" (peft's name, so it saves as a plain adapter; starts from the SFT adapter, or fresh when SFT was merged)
    reference  the frozen SFT adapter, or the base with adapters off when SFT was merged
    critic     trainable adapter + value head (starts from the reward adapter and head, as in
               InstructGPT, or from the SFT model)
    reward     frozen reward adapter + score head
Full mode keeps separate models, as everyone else does.

Switching adapters goes through peft's layer attribute rather than `set_adapter`, because
`set_adapter` also flips requires_grad, which would freeze the policy while the critic runs.

Dimensions: B rollouts, P prompt tokens (left-padded), R response tokens (right-padded), T = P + R.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

from rlhflab.errors import UsageError
from rlhflab.losses import entropy_from_logits, gather_logprobs, last_token_index
from rlhflab.models.forward import (
    _forward_kwargs,
    active_adapter,
    hidden_states,
    packed_response_logprobs,
    response_logprobs,
    response_selection,
    trim_left_padding,
)
from rlhflab.models.heads import causal_lm, logits_at
from rlhflab.models.loading import (
    adapter_base,
    check_model_directory,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
    load_trainable,
    mark_end_of_turn,
    record_adapter_base,
    save_generation_config,
    save_model,
)
from rlhflab.models.packing import packing_agrees
from rlhflab.rewards.model import load_score_head, reads_policy_tokens


class ValueHead(nn.Module):
    """Per-token scalar on the body's hidden state (fp32)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class Roles(nn.Module):
    """Holds every role. Trainable parts (policy, critic adapter, value head) are parameters of this
    module; in full mode the frozen reference and reward models sit outside its parameters."""

    def __init__(self, lm, value_head: ValueHead, score_head: nn.Module, *, lora: bool, reference_adapter: str | None,
                 reward_adapter: str | None, critic_adapter: str | None, frozen: dict | None = None,
                 critic_lm=None, shared_critic: bool = False):
        super().__init__()
        self.shared_critic = shared_critic  # value head on the policy's body: one forward for both
        self.pack_group = 1  # > 1: rollouts come in groups of this many samples of one prompt, run packed
        self.lm, self.value_head, self.score_head = lm, value_head, score_head
        self.critic_lm = critic_lm  # full mode only: the critic's own (trainable) body
        self.lora = lora
        self.reference_adapter, self.reward_adapter, self.critic_adapter = reference_adapter, reward_adapter, critic_adapter
        # Full mode: {"reference": model, "reward": model}; frozen, so not registered as submodules.
        self.__dict__["frozen"] = frozen or {}
        if self.score_head is not None:  # None: the reward is a program (--reward judge), not a model
            self.score_head.requires_grad_(False)

    def _role(self, role: str):
        """(model, adapter name or None, use-adapter flag) for a role."""
        if not self.lora:
            model = {"policy": self.lm, "critic": self.critic_lm}.get(role) or self.frozen[role]
            return model, None, False
        adapter = {"policy": "default", "reference": self.reference_adapter, "critic": self.critic_adapter,
                   "reward": self.reward_adapter}[role]
        return self.lm, adapter, True

    def logprobs(self, role: str, input_ids, attention_mask, prompt_len: int, with_entropy: bool = False,
                 group: int = 1):
        """(B, R) response log-probs under a role; with `group` > 1 the rows come in groups of
        samples of one prompt and run packed, the prompt once per group."""
        model, adapter, switch = self._role(role)
        input_ids, attention_mask, prompt_len = trim_left_padding(causal_lm(model), input_ids, attention_mask,
                                                                  prompt_len)
        with active_adapter(model, adapter) if switch else contextlib.nullcontext():
            if group > 1:
                return packed_response_logprobs(model, input_ids, attention_mask, prompt_len, group, with_entropy)
            return response_logprobs(model, input_ids, attention_mask, prompt_len, with_entropy)

    def can_share_prompt(self, vocab_size: int) -> bool:
        """Whether the policy gives packed groups the log-probs it gives single rows, on a made-up
        rollout (two prompts, one left-padded, two samples each). Models that cannot take a 4D
        mask or explicit positions fail here and RL runs every sample with its own prompt."""
        ids = torch.Generator().manual_seed(0)
        draw = lambda n: torch.randint(3, max(vocab_size, 4), (n,), generator=ids)  # noqa: E731
        prompt_len, response = 6, 4
        rows, masks = [], []
        for real in (6, 4):
            prompt = torch.cat([torch.zeros(prompt_len - real, dtype=torch.long), draw(real)])
            for _ in range(2):
                rows.append(torch.cat([prompt, draw(response)]))
                masks.append(torch.cat([torch.zeros(prompt_len - real), torch.ones(real + response)]).long())
        device = next(self.lm.parameters()).device
        input_ids, attention_mask = torch.stack(rows).to(device), torch.stack(masks).to(device)
        return packing_agrees(
            self.lm, lambda: self.logprobs("policy", input_ids, attention_mask, prompt_len, group=2)[0],
            lambda: self.logprobs("policy", input_ids, attention_mask, prompt_len)[0], causal_lm(self.lm).dtype)

    def policy_and_values(self, input_ids, attention_mask, prompt_len: int, with_entropy: bool = False):
        """Shared critic: (B, R) log-probs, entropy or None, and values from ONE forward of the policy."""
        model, adapter, switch = self._role("policy")
        input_ids, attention_mask, prompt_len = trim_left_padding(causal_lm(model), input_ids, attention_mask,
                                                                  prompt_len)
        select = response_selection(input_ids, prompt_len)
        with active_adapter(model, adapter) if switch else contextlib.nullcontext():
            logits, hidden = logits_at(model, select, return_hidden=True,
                                       **_forward_kwargs(causal_lm(model), input_ids, attention_mask))
        targets = input_ids[:, prompt_len:]
        logits = logits.view(*targets.shape, -1)
        logprobs = gather_logprobs(logits, targets)
        values = self.value_head(hidden[:, prompt_len - 1:-1])
        return logprobs, entropy_from_logits(logits) if with_entropy else None, values

    def values(self, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        """(B, R) value of the state before each response token."""
        if self.shared_critic:
            return self.policy_and_values(input_ids, attention_mask, prompt_len)[2]
        model, adapter, switch = self._role("critic")
        input_ids, attention_mask, prompt_len = trim_left_padding(causal_lm(model), input_ids, attention_mask,
                                                                  prompt_len)
        with active_adapter(model, adapter) if switch else contextlib.nullcontext():
            hidden = hidden_states(model, input_ids, attention_mask)
        return self.value_head(hidden[:, prompt_len - 1:-1])

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        """(B,) reward model score at the last real token of each sequence."""
        model, adapter, switch = self._role("reward")
        with active_adapter(model, adapter) if switch else contextlib.nullcontext():
            hidden = hidden_states(model, input_ids, attention_mask)
        last = last_token_index(attention_mask)  # (B,)
        return self.score_head(hidden[torch.arange(hidden.shape[0]), last].float()).squeeze(-1)

    def trainable_parameters(self, role: str) -> list[nn.Parameter]:
        if role == "critic":
            params = list(self.value_head.parameters())
            if self.shared_critic:
                return params  # the body it reads is the policy's, trained by the policy's group
            if self.lora:
                params += [p for n, p in self.lm.named_parameters() if f".{self.critic_adapter}." in n]
            else:
                params += list(self.critic_lm.parameters())
            return params
        if self.lora:
            return [p for n, p in self.lm.named_parameters() if ".default." in n]
        return list(self.lm.parameters())


def base_weight_copies(roles: Roles) -> int:
    """How many distinct tensors hold the first base projection weight across all roles (1 in LoRA mode)."""
    pointers = set()
    for model in [roles.lm, *roles.frozen.values()]:
        for name, p in causal_lm(model).named_parameters():
            if name.endswith("q_proj.base_layer.weight") or name.endswith("q_proj.weight") or \
                    name.endswith("c_attn.base_layer.weight") or name.endswith("c_attn.weight"):
                pointers.add(p.data_ptr())
                break
    return len(pointers)


def clone_frozen(model):
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    frozen.eval()
    return frozen


# ---------------------------------------------------------------------------------------------
# Loading the roles from the stage directories of SFT and RM.


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def load_roles(config, placement):
    """Build every role from --policy (SFT) and --reward (RM). Returns (roles, tokenizer, info)."""

    policy_dir = config.policy or config.model

    reward_dir = None if config.reward == "judge" else config.reward
    for option, path in (("--policy", policy_dir), ("--reward", reward_dir)):
        if path is not None and not Path(path).is_dir():
            raise UsageError(f"{option} {path}: no such directory")
        if path is not None:
            check_model_directory(Path(path), option)
    tokenizer = load_tokenizer(config.tokenizer or policy_dir, config.trust_remote_code, config.chat_template,
                               "--tokenizer" if config.tokenizer else "--policy")
    # The judge, a sequence classifier and a reward model with another vocabulary score the
    # answers' text (text_rewards.text_reward): then there is no reward role, and the critic starts from SFT.
    rm_dir = reward_dir if reward_dir and reads_policy_tokens(reward_dir, tokenizer, config.trust_remote_code) else None
    critic_init = config.critic_init if rm_dir else "sft"
    tokenizer.padding_side = "left"
    policy_is_adapter = is_adapter_dir(policy_dir)
    base_name = adapter_base(policy_dir) if policy_is_adapter else policy_dir
    rm_is_adapter = rm_dir is not None and is_adapter_dir(rm_dir)
    info = {"base": base_name, "policy_is_adapter": policy_is_adapter}

    if not config.lora:
        policy = load_trainable(config, placement, policy_dir, "--policy", tokenizer=tokenizer).model
        reference = clone_frozen(policy)
        frozen = {"reference": reference}
        if rm_dir:
            frozen["reward"] = clone_frozen(load_causal_lm(rm_dir, placement, config.trust_remote_code))
        critic_source = rm_dir if critic_init == "reward" else policy_dir
        # Critic-free estimators never run the critic: do not hold a fourth model for it.
        critic = (load_causal_lm(critic_source, placement, config.trust_remote_code, train_full=True)
                  if config.estimator_spec.critic and config.critic == "separate" else None)
        hidden = policy.config.hidden_size
        score_head = load_score_head(rm_dir, hidden, placement.device) if rm_dir else None
        from_reward = critic_init == "reward" and config.critic == "separate"
        value_head = _value_head(hidden, score_head if from_reward else None, placement.device)
        roles = Roles(policy, value_head, score_head, lora=False, reference_adapter=None, reward_adapter=None,
                      critic_adapter=None, frozen=frozen, critic_lm=critic,
                      shared_critic=config.critic == "shared")
        return roles, tokenizer, info

    if rm_dir and not (rm_is_adapter and _same_path(adapter_base(rm_dir), base_name)):
        raise UsageError(
            f"--lora keeps one copy of the base weights, so the reward model must be a LoRA adapter on the same "
            f"base as the policy ({base_name}); {rm_dir} is "
            + (f"an adapter on {adapter_base(rm_dir)}" if rm_is_adapter else "a full model")
            + ". Train it with `rlhflab rm --lora --model <the SFT model>`, or run PPO without --lora.")
    lm = load_trainable(config, placement, policy_dir, "--policy", tokenizer=tokenizer).model
    reference_adapter = None  # the SFT weights are the base: adapters off
    if policy_is_adapter:   # the policy trains on from the SFT adapter; a frozen copy of it is the reference
        lm.load_adapter(policy_dir, adapter_name="reference", is_trainable=False)
        reference_adapter = "reference"
    hidden = lm.get_base_model().config.hidden_size
    score_head = None
    if rm_dir:
        lm.load_adapter(rm_dir, adapter_name="reward", is_trainable=False)
        score_head = load_score_head(rm_dir, hidden, placement.device)
    if config.critic == "shared":
        value_head = _value_head(hidden, None, placement.device)  # on the policy's body, not the reward's
    elif critic_init == "reward":
        lm.load_adapter(rm_dir, adapter_name="critic", is_trainable=True)
        value_head = _value_head(hidden, score_head, placement.device)
    else:
        lm.add_adapter("critic", lm.peft_config["default"])
        value_head = _value_head(hidden, None, placement.device)
    # load_adapter/add_adapter may toggle flags: set exactly what trains.
    for name, param in lm.named_parameters():
        param.requires_grad = (".default." in name) or (config.estimator_spec.critic and ".critic." in name)
    roles = Roles(lm, value_head, score_head, lora=True, reference_adapter=reference_adapter,
                  reward_adapter="reward" if rm_dir else None,
                  critic_adapter=None if config.critic == "shared" else "critic",
                  shared_critic=config.critic == "shared")
    return roles, tokenizer, info


def _value_head(hidden: int, score_head: nn.Linear | None, device) -> ValueHead:
    head = ValueHead(hidden).to(device)
    if score_head is not None:  # InstructGPT: the value function starts from the reward model
        with torch.no_grad():
            head.linear.weight.copy_(score_head.weight)
            if score_head.bias is not None:
                head.linear.bias.copy_(score_head.bias)
    return head


def load_eval_reward_model(path: str, placement):
    """A second, held-out reward model for the monitors: an object with .scores(ids, mask)."""

    model = clone_frozen(load_causal_lm(path, placement, option="--eval-reward-model"))
    head = load_score_head(Path(path), model.config.hidden_size, placement.device, "--eval-reward-model")
    head.requires_grad_(False)
    return Roles(model, ValueHead(model.config.hidden_size), head, lora=False, reference_adapter=None,
                 reward_adapter=None, critic_adapter=None, frozen={"reward": model})


def save_policy(roles: Roles, tokenizer, out: Path, info: dict) -> None:
    """The trained policy like every other stage: a peft adapter on the original base, or a full model."""
    save_trained_policy(roles.lm, tokenizer, out, roles.lora, info["base"])


def save_trained_policy(lm, tokenizer, out: Path, lora: bool, base_name: str | None) -> None:
    """Save the adapter named "default" (recording its base) or the full model, with a right-padding tokenizer."""

    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "right"
    if lora:
        out.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(str(out), selected_adapters=["default"], safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        mark_end_of_turn(lm, tokenizer)
        save_generation_config(lm, out)
        record_adapter_base(out, base_name)
    else:
        save_model(lm, tokenizer, out)
