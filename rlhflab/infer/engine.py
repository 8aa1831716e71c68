"""The one generation engine (token in, token out) behind rollouts, evaluation, sampling and chat.

Our own decoding loop over the model's KV cache rather than `model.generate`, so the guards are
exactly ours: logits are checked to be finite every step (softmax in fp32) and a failure names
the step and the prompt; stop tokens can be suppressed for the first `min_new_tokens` tokens (so
that a policy cannot learn to answer nothing); rows end on a stop token or stop string; prompts are batched
left-padded with matching position ids.

Dimensions: B prompts, P prompt tokens (left-padded), R generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from rlhflab.data.template import encode_prompt, stop_token_ids
from rlhflab.errors import NonFiniteError
from rlhflab.models.forward import position_ids, takes_position_ids


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0          # stop tokens are masked until this many tokens exist
    temperature: float = 1.0         # 0 (or do_sample=False) = greedy
    top_k: int = 0                   # 0 = off
    top_p: float = 1.0
    do_sample: bool = True
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Generation:
    prompt_ids: torch.Tensor       # (B, P) left-padded
    prompt_mask: torch.Tensor      # (B, P)
    response_ids: torch.Tensor     # (B, R) right-padded with pad id
    response_mask: torch.Tensor    # (B, R) 1 on generated tokens, stop token included
    finished: torch.Tensor         # (B,) ended by a stop token/string, not by max_new_tokens
    texts: list[str]               # decoded responses without the stop token or string

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + response ids and attention mask, (B, P + R)."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))

    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def rendered(self, turn_end: list[int], stop_ids, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + answer as the chat template renders a finished turn, left-padded: the answer up
        to its stop token, then the template's end-of-turn tokens (data.template.turn_end_ids). A
        reward model is trained on rendered conversations and reads its score after those tokens;
        read at the stop token itself it would score a position it never saw in training."""
        stops, rows = set(stop_ids), []
        for row in range(self.response_ids.shape[0]):
            prompt = self.prompt_ids[row][self.prompt_mask[row].bool()].tolist()
            answer = self.response_ids[row][self.response_mask[row].bool()].tolist()
            cut = next((i for i, token in enumerate(answer) if token in stops), len(answer))
            rows.append(prompt + answer[:cut] + list(turn_end))
        ids, mask = left_pad(rows, pad_id)
        return ids.to(self.prompt_ids.device), mask.to(self.prompt_ids.device)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


def _accepts_position_ids(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return takes_position_ids(inner)


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on fp32 logits (B, V)."""
    logits = logits / max(params.temperature, 1e-6)
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > params.top_p  # keep the first token past top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def trained_min_new_tokens(model) -> int:
    """The EOS guard a policy was trained under (PPO writes its --min-new-tokens into the model's
    generation config): it is kept when the model is decoded later, since the policy never learned
    what follows an EOS it was never allowed to sample there."""

    generation = getattr(model, "generation_config", None)
    return int(getattr(generation, "min_new_tokens", None) or 0)


@torch.no_grad()
def _generate_chunk(model, tokenizer, prompts, params, step, prompt_texts, offset, on_text, on_row=None) -> Generation:
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    batch = prompt_ids.shape[0]
    stops = torch.tensor(list(params.stop_token_ids), dtype=torch.long, device=device)
    greedy = not params.do_sample or params.temperature == 0
    generator = None
    if params.seed is not None and not greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    use_positions = _accepts_position_ids(model)
    min_new_tokens = max(params.min_new_tokens, trained_min_new_tokens(model))

    attention = prompt_mask.clone()
    tokens = torch.empty((batch, 0), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    past, inputs = None, prompt_ids
    texts_so_far = [""] * batch
    for position in range(params.max_new_tokens):
        kwargs = {"input_ids": inputs, "attention_mask": attention, "past_key_values": past, "use_cache": True}
        if use_positions:
            kwargs["position_ids"] = position_ids(attention)[:, -inputs.shape[1]:]
        out = model(**kwargs)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()                                    # (B, V)
        bad = ~torch.isfinite(logits).all(-1) & ~done
        if bad.any():
            row = int(bad.nonzero()[0])
            shown = f": {prompt_texts[offset + row][:80]!r}" if prompt_texts else ""
            raise NonFiniteError(f"non-finite logits at training step {step}, decode position {position}, "
                                 f"prompt {offset + row}{shown}")
        if params.repetition_penalty != 1.0 and tokens.numel():
            seen = logits.gather(1, tokens)
            seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
            logits = logits.scatter(1, tokens, seen)
        if position < min_new_tokens and stops.numel():
            logits[:, stops] = float("-inf")
        if greedy:
            next_token = logits.argmax(-1)
        else:
            probs = _filter_logits(logits, params).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        next_token = torch.where(done, torch.full_like(next_token, pad_id), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], 1)
        lengths += (~done).long()
        hit_stop = torch.isin(next_token, stops) & ~done if stops.numel() else torch.zeros_like(done)
        if params.stop_strings or on_text or on_row:
            for row in range(batch):
                if done[row]:
                    continue
                text = tokenizer.decode(tokens[row, : int(lengths[row])], skip_special_tokens=True)
                # A character split over byte-level tokens decodes to U+FFFD until its last byte
                # arrives: hold it back, or the stream would show the placeholder and lose the character.
                if on_text and batch == 1 and not hit_stop[row] and not text.endswith("\ufffd"):
                    on_text(text[len(texts_so_far[row]):])
                    texts_so_far[row] = text
                if any(s in text for s in params.stop_strings):
                    hit_stop[row] = True
                if on_row and on_row(offset + row, text, int(lengths[row]), bool(hit_stop[row])):
                    hit_stop[row] = True
        finished |= hit_stop
        done |= hit_stop
        attention = torch.cat([attention, (~done | hit_stop).long()[:, None]], 1)
        if done.all():
            break
        inputs = next_token[:, None]

    response_mask = (torch.arange(tokens.shape[1], device=device)[None, :] < lengths[:, None]).long()
    texts = []
    for row in range(batch):
        ids = tokens[row, : int(lengths[row])].tolist()
        if finished[row] and ids and ids[-1] in params.stop_token_ids:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        for s in params.stop_strings:
            text = text.split(s)[0]
        texts.append(text)
    return Generation(prompt_ids, prompt_mask, tokens.masked_fill(response_mask == 0, pad_id), response_mask,
                      finished, texts)


def generate(model, tokenizer, prompts: list[list[int]], params: SamplingParams, *, step: int | None = None,
             prompt_texts: list[str] | None = None, batch_size: int | None = None,
             on_text: Callable[[str], None] | None = None,
             on_row: Callable[[int, str, int, bool], bool] | None = None) -> Generation:
    """Generate for token-id prompts; chunks of `batch_size` are padded to one common width.

    `on_row(row, text, n_tokens, ended)` is called for every unfinished row after each step with its
    text so far and whether a stop token/string just ended it; returning True ends that row there
    (the server streams each row and applies each request's own stop strings and length this way)."""
    if not prompts:
        raise ValueError("no prompts to generate for")
    was_training = model.training
    model.eval()
    try:
        size = batch_size or len(prompts)
        chunks = [_generate_chunk(model, tokenizer, prompts[i:i + size], params, step, prompt_texts, i, on_text, on_row)
                  for i in range(0, len(prompts), size)]
    finally:
        model.train(was_training)
    return chunks[0] if len(chunks) == 1 else _concat(chunks, tokenizer)


def _concat(chunks: list[Generation], tokenizer) -> Generation:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def pad_to(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        return torch.cat([extra, t] if left else [t, extra], 1)

    p = max(c.prompt_ids.shape[1] for c in chunks)
    r = max(c.response_ids.shape[1] for c in chunks)
    return Generation(
        torch.cat([pad_to(c.prompt_ids, p, pad_id, True) for c in chunks]),
        torch.cat([pad_to(c.prompt_mask, p, 0, True) for c in chunks]),
        torch.cat([pad_to(c.response_ids, r, pad_id, False) for c in chunks]),
        torch.cat([pad_to(c.response_mask, r, 0, False) for c in chunks]),
        torch.cat([c.finished for c in chunks]),
        [t for c in chunks for t in c.texts],
    )


def generate_text(model, tokenizer, conversations: list[list[dict]], params: SamplingParams, **kw) -> Generation:
    prompts = [encode_prompt(tokenizer, messages) for messages in conversations]
    kw.setdefault("prompt_texts", [messages[-1]["content"] for messages in conversations])
    return generate(model, tokenizer, prompts, params, **kw)


def stream_chat(model, tokenizer, messages: list[dict], params: SamplingParams) -> Iterator[str]:
    """Yield text deltas of one answer as it is generated (collected, then replayed in order)."""
    pieces: list[str] = []
    generate_text(model, tokenizer, [messages], params, on_text=pieces.append)
    yield from pieces


def greedy_answers(model, tokenizer, records: list, max_new_tokens: int, batch_size: int) -> list[dict]:
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)))
    out = generate_text(model, tokenizer, [r.messages for r in records], params, batch_size=batch_size)
    return [{"messages": r.messages, "response": text, "meta": r.meta} for r, text in zip(records, out.texts)]
