"""Measuring a policy the way the pipeline's table reports it: exact task accuracy of sampled and greedy
answers on held-out prompts, the reward model's mean score of those samples, and their KL to a reference."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..dataset import pad_sequences
from ..models import Actor, RewardModel
from ..models.generation import generate_with_masks

Checker = Callable[[str, str, dict], bool]


@contextlib.contextmanager
def _eval_mode(*models: nn.Module | None):
    states = [(m, m.training) for m in models if m is not None]
    for m, _ in states:
        m.eval()
    try:
        yield
    finally:
        for m, was in states:
            m.train(was)


@torch.no_grad()
def rollout(actor: Actor, tokenizer: Any, prompt_ids: Sequence[torch.Tensor], *, greedy: bool,
            max_new_tokens: int, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(sequences, attention_mask, action_mask)]`` per batch of left-padded prompts (temperature 1 when
    sampling, so the samples come from the very policy PPO trains)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(actor.parameters()).device
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                     "top_p": 1.0}
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        ids, mask = pad_sequences(list(prompt_ids[s: s + batch_size]), pad_id, side="left")
        seq, attn, act = generate_with_masks(actor, ids.to(device), mask.to(device),
                                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
                                             max_new_tokens=max_new_tokens, **sampling)
        seq = seq.clone()
        seq[:, -act.size(1):].masked_fill_(act.eq(0), pad_id)
        out.append((seq, attn, act))
    return out


def decode_actions(tokenizer: Any, seq: torch.Tensor, action_mask: torch.Tensor) -> list[str]:
    actions = seq[:, -action_mask.size(1):]
    return [tokenizer.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=True)
            for row, mask in zip(actions.tolist(), action_mask.tolist())]


@torch.no_grad()
def evaluate_policy(actor: Actor, tokenizer: Any, items: Sequence[dict], *, max_new_tokens: int,
                    checker: Checker | None = None, reward_model: RewardModel | None = None,
                    reference: Actor | None = None, samples_per_prompt: int = 1, seed: int = 0,
                    batch_size: int = 256) -> dict[str, float]:
    """Held-out metrics of ``actor`` on PromptDataset items (``input_ids``, ``prompt`` and extras).

    ``accuracy`` (sampled, temperature 1) and ``accuracy_greedy`` need a ``checker(prompt, response, extras)``;
    ``reward`` (mean reward-model score of the samples) needs ``reward_model``; ``kl`` (mean over samples of
    the summed per-token log pi - log pi_ref) needs ``reference``. Sampling uses its own seeded RNG, so the
    numbers do not depend on (or disturb) the training RNG.
    """
    items = list(items) * samples_per_prompt
    prompt_ids = [it["input_ids"] for it in items]
    result: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]), _eval_mode(actor, reward_model, reference):
        torch.manual_seed(seed)
        sampled = rollout(actor, tokenizer, prompt_ids, greedy=False, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
        responses = [r for seq, _, act in sampled for r in decode_actions(tokenizer, seq, act)]
        if checker is not None:
            extras = [{k: v for k, v in it.items() if k not in ("input_ids", "prompt")} for it in items]
            result["accuracy"] = _mean(checker(it["prompt"], r, ex) for it, r, ex in zip(items, responses, extras))
            n = len(items) // samples_per_prompt
            greedy = rollout(actor, tokenizer, prompt_ids[:n], greedy=True, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
            g_resp = [r for seq, _, act in greedy for r in decode_actions(tokenizer, seq, act)]
            result["accuracy_greedy"] = _mean(checker(it["prompt"], r, ex)
                                              for it, r, ex in zip(items[:n], g_resp, extras[:n]))
        if reward_model is not None:
            scores = torch.cat([reward_model(seq, attn).float() for seq, attn, _ in sampled])
            result["reward"] = float(scores.mean())
        if reference is not None:
            kls = []
            for seq, attn, act in sampled:
                n_act = act.size(1)
                lp = actor(seq, attn, num_actions=n_act).float()
                ref = reference(seq, attn, num_actions=n_act).float()
                kls.append(((lp - ref) * act).sum(-1))
            result["kl"] = float(torch.cat(kls).mean())
        result["response_length"] = float(torch.cat([act.sum(-1).float() for _, _, act in sampled]).mean())
    return result


@torch.no_grad()
def standardize_reward_model(reward_model: RewardModel, actor: Actor, tokenizer: Any,
                             prompt_ids: Sequence[torch.Tensor], *, max_new_tokens: int, seed: int = 0,
                             batch_size: int = 256) -> dict[str, float]:
    """Shift and scale ``reward_model``'s value head in place so that it scores ``actor``'s samples of the
    prompts with mean 0 and standard deviation 1; returns the raw ``mean`` and ``std``.

    A pairwise loss fixes only score differences, and their scale keeps growing with training, so a KL
    coefficient against raw scores means something different after every reward-model run. On this scale
    ``kl_coef`` is the weight of one nat of KL in units of the reward's spread over the SFT policy's answers
    (as Stiennon et al. 2020 normalise their reward model on reference samples). The ranking is unchanged."""
    with torch.random.fork_rng(devices=[]), _eval_mode(actor, reward_model):
        torch.manual_seed(seed)
        sampled = rollout(actor, tokenizer, prompt_ids, greedy=False, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
        scores = torch.cat([reward_model(seq, attn).float() for seq, attn, _ in sampled])
    mean, std = float(scores.mean()), float(scores.std().clamp(min=1e-6))
    head = reward_model.value_head
    head.weight.div_(std)
    head.bias.sub_(mean).div_(std)
    return {"mean": mean, "std": std}


@torch.no_grad()
def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / max(1, len(values))
