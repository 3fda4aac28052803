"""Every ``--algo`` gives one update on 1 and 2 processes, with 1 or 2 accumulation steps (``tests/test_rl.py``).

    torchrun --nproc_per_node=2 tests/dist_rl.py OUT ddp     # samples, records each prompt's responses
    python tests/dist_rl.py OUT single                       # one process, 2x the batch, replays them
    torchrun --nproc_per_node=2|4 tests/dist_rl.py OUT tp grpo   # fsdp --tp_size 2 (dp 1|2): samples, records
                                                                 # (tests/test_tp.py), checks greedy generation

Ranks sample from their own streams, which one process cannot reproduce, so every run after the first replays the
responses the first generated (same prompt, same episode): everything after generation (scores, advantages,
log-probs, KL terms, losses, gradients and Adam) is then computed independently by each run. Responses are cut
at random lengths (1 to 8 tokens) so the processes and micro-batches hold different numbers of tokens, which is
where a per-process normaliser would show. Each mode runs every algorithm with ``accumulation_steps`` 1 (the
buffer in one micro-batch) and 2 (in two), one optimizer step per pass over the buffer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coati.rl import PRESETS  # noqa: E402
from coati.dataset import PromptCollator  # noqa: E402
from coati.models.generation import action_mask_from_tokens, generate_with_masks  # noqa: E402
from coati.rollout import hf as hf_engine  # noqa: E402
from tests import dist_ppo as h  # noqa: E402
from tests import tiny  # noqa: E402

N = 4  # samples per prompt
PROMPTS_PER_RANK = 2
ALGOS = tuple(PRESETS)
KW = dict(n_samples_per_prompt=N, num_episodes=2, num_collect_steps=1, num_update_steps=1, max_epochs=2, lr=1e-3,
          critic_lr=1e-3, max_new_tokens=8, log_interval=1000)
# DAPO's dynamic sampling picks groups per process (a process tops up from its own next prompts), so its kept
# set depends on the number of processes by design; the rest of DAPO (clip-higher, token mean, the overlong
# penalty) is compared.
OVERRIDES = {"dapo": {"dynamic_sampling": False}}
PAD, EOS = 0, 2


def _key(episode: int, ids: torch.Tensor, mask: torch.Tensor) -> str:
    return f"{episode}:{ids[mask.bool()].tolist()}"


def _rollout(input_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: list[list[int]]):
    """What ``generate_with_masks`` returns, for these responses (a row without EOS keeps its own length)."""
    width = max(len(r) for r in responses)
    actions = torch.full((len(responses), width), PAD, dtype=input_ids.dtype)
    for r, tokens in enumerate(responses):
        actions[r, :len(tokens)] = torch.tensor(tokens)
    action_mask = action_mask_from_tokens(actions, EOS).to(prompt_mask.dtype)
    for r, tokens in enumerate(responses):
        action_mask[r, len(tokens):] = 0
    return torch.cat([input_ids, actions], 1), torch.cat([prompt_mask, action_mask], 1), action_mask


def _record(trainer, recorded: dict[str, list[list[int]]]):
    """Sample, cut each response at a random length (seeded by its tokens), record it under its prompt."""
    def generate(model, input_ids, prompt_mask, **kw):
        seqs, _, action_mask = generate_with_masks(model, input_ids, prompt_mask, **kw)
        responses = []
        for row in range(seqs.size(0)):
            tokens = seqs[row, input_ids.size(1):][action_mask[row].bool()].tolist()
            g = torch.Generator().manual_seed(hash(tuple(tokens)) % (2 ** 31))
            cut = int(torch.randint(1, len(tokens) + 1, (1,), generator=g))
            responses.append(tokens[:cut - 1] + [EOS] if cut < len(tokens) else tokens)
            recorded.setdefault(_key(trainer.episode, input_ids[row], prompt_mask[row]), []).append(responses[-1])
        return _rollout(input_ids, prompt_mask, responses)
    return generate


def _replay(trainer, recorded: dict[str, list[list[int]]]):
    replay = {k: list(v) for k, v in recorded.items()}

    def generate(model, input_ids, prompt_mask, **kw):
        return _rollout(input_ids, prompt_mask, [replay[_key(trainer.episode, input_ids[r], prompt_mask[r])].pop(0)
                                                 for r in range(input_ids.size(0))])
    return generate


def run(algo: str, strategy, accumulation: int, generate_hook) -> tuple[list[dict], dict]:
    from coati.trainer.ppo import PPOTrainer

    batch = PROMPTS_PER_RANK * (2 // strategy.dp_size)
    actor, critic = h.models(seed=0)
    loader = strategy.setup_dataloader(h.prompt_data(16), batch, shuffle=False, collate_fn=PromptCollator(0))
    trainer = PPOTrainer(strategy, actor, critic if algo == "ppo" else None, tokenizer=tiny.tokenizer("llama"),
                         reward_fn=h.target_share, algo=algo, train_batch_size=batch * N // accumulation,
                         accumulation_steps=accumulation, **{**KW, **OVERRIDES.get(algo, {})})
    hf_engine.generate_with_masks = generate_hook(trainer)  # what the HF rollout engine samples with
    history = trainer.fit(loader)
    state = strategy.unwrap(trainer.actor).state_dict()
    return history, {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def check_greedy_generation(strategy) -> None:
    """A tensor-parallel (and FSDP-sharded) actor generates greedily the tokens the whole model does."""
    from coati.models.generation import generate_with_masks

    whole, _ = h.models(seed=0)
    sharded = strategy.prepare_model(h.models(seed=0)[0])
    batch = PromptCollator(0)(h.prompt_data(4, seed=strategy.dp_rank))
    kw = dict(eos_token_id=EOS, pad_token_id=PAD, do_sample=False, max_new_tokens=8)
    want = generate_with_masks(whole, batch["input_ids"], batch["attention_mask"], **kw)[0]
    got = generate_with_masks(sharded, batch["input_ids"], batch["attention_mask"], **kw)[0]
    if not torch.equal(got, want):
        raise AssertionError(f"rank {strategy.rank}: greedy tokens under tensor parallelism {got.tolist()} != "
                             f"{want.tolist()}")


def main(out: str, mode: str, algos: tuple[str, ...] = ALGOS) -> None:
    from coati.trainer.strategies import DDPStrategy, NaiveStrategy, make_strategy

    if mode == "tp":
        strategy = make_strategy("fsdp", seed=0, tp_size=2)
        check_greedy_generation(strategy)
    else:
        strategy = DDPStrategy(seed=0) if mode == "ddp" else NaiveStrategy(seed=0)
    recorded: dict[str, dict[str, list[list[int]]]] = {}
    if mode == "single":
        for f in sorted(Path(out).glob("responses_rank*.json")):
            for algo, responses in json.loads(f.read_text()).items():
                recorded.setdefault(algo, {}).update(responses)
    results = {}
    for algo in algos:
        for accumulation in (1,) if mode == "tp" else (1, 2):
            rec = recorded.setdefault(algo, {})
            if mode in ("ddp", "tp") and accumulation == 1:  # the first run samples; every other replays its responses
                hook = lambda trainer, rec=rec: _record(trainer, rec)  # noqa: E731
            else:
                hook = lambda trainer, rec=rec: _replay(trainer, rec)  # noqa: E731
            history, weights = run(algo, strategy, accumulation, hook)
            if strategy.is_rank0():
                torch.save(weights, Path(out, f"actor_{algo}_{mode}_{accumulation}.pt"))
                results[f"{algo}_{accumulation}"] = history
    if mode in ("ddp", "tp"):
        Path(out, f"responses_rank{strategy.rank}.json").write_text(json.dumps(recorded))
    if strategy.is_rank0():
        Path(out, f"history_{mode}.json").write_text(json.dumps(results))
    strategy.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], tuple(sys.argv[3:]) or ALGOS)
