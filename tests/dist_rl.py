"""GRPO under DDP against one process with the same global batch (``tests/test_rl.py``).

    torchrun --nproc_per_node=2 tests/dist_rl.py OUT ddp     # samples, records each prompt's responses
    python tests/dist_rl.py OUT single                       # one process, 2x the batch, replays them

Ranks sample from their own streams, which one process cannot reproduce, so the single-process run replays
the responses the ranks generated (same prompt, same episode): everything after generation (scores, group
advantages, log-probs, the KL loss, gradients and Adam) is then computed independently by both runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coati.dataset import PromptCollator  # noqa: E402
from coati.models.generation import action_mask_from_tokens, generate_with_masks  # noqa: E402
from coati.rollout import hf as hf_engine  # noqa: E402
from tests import dist_ppo as h  # noqa: E402
from tests import tiny  # noqa: E402

N = 4  # samples per prompt
PROMPTS_PER_RANK = 2
KW = dict(algo="grpo", n_samples_per_prompt=N, num_episodes=2, num_collect_steps=1, num_update_steps=1,
          max_epochs=2, lr=1e-3, max_new_tokens=8, log_interval=1000)


def _key(episode: int, ids: torch.Tensor, mask: torch.Tensor) -> str:
    return f"{episode}:{ids[mask.bool()].tolist()}"


def main(out: str, mode: str) -> None:
    from coati.trainer.ppo import PPOTrainer
    from coati.trainer.strategies import DDPStrategy, NaiveStrategy

    strategy = DDPStrategy(seed=0) if mode == "ddp" else NaiveStrategy(seed=0)
    batch = PROMPTS_PER_RANK * (2 // strategy.world_size)
    actor, _ = h.models(seed=0)
    loader = strategy.setup_dataloader(h.prompt_data(16), batch, shuffle=False, collate_fn=PromptCollator(0))
    trainer = PPOTrainer(strategy, actor, None, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                         train_batch_size=batch * N, **KW)
    pad, eos = 0, 2
    if mode == "ddp":
        recorded: dict[str, list[list[int]]] = {}

        def generate(model, input_ids, prompt_mask, **kw):
            seqs, attn, action_mask = generate_with_masks(model, input_ids, prompt_mask, **kw)
            actions = seqs[:, input_ids.size(1):]
            for row in range(seqs.size(0)):
                recorded.setdefault(_key(trainer.episode, input_ids[row], prompt_mask[row]), []).append(
                    actions[row][action_mask[row].bool()].tolist())
            return seqs, attn, action_mask
    else:
        replay: dict[str, list[list[int]]] = {}
        for f in sorted(Path(out).glob("responses_rank*.json")):
            replay.update(json.loads(f.read_text()))

        def generate(model, input_ids, prompt_mask, **kw):
            responses = [replay[_key(trainer.episode, input_ids[r], prompt_mask[r])].pop(0)
                         for r in range(input_ids.size(0))]
            width = max(len(r) for r in responses)
            actions = torch.full((len(responses), width), pad, dtype=input_ids.dtype)
            for r, tokens in enumerate(responses):
                actions[r, :len(tokens)] = torch.tensor(tokens)
            action_mask = action_mask_from_tokens(actions, eos).to(prompt_mask.dtype)
            for r, tokens in enumerate(responses):  # a row cut by the budget has no EOS: mask its own length
                action_mask[r, len(tokens):] = 0
            return (torch.cat([input_ids, actions], 1), torch.cat([prompt_mask, action_mask], 1), action_mask)
    hf_engine.generate_with_masks = generate  # what the HF rollout engine samples with
    history = trainer.fit(loader)
    if mode == "ddp":
        Path(out, f"responses_rank{strategy.rank}.json").write_text(json.dumps(recorded))
    if strategy.is_rank0():
        torch.save(strategy.unwrap(trainer.actor).state_dict(), Path(out, f"actor_{mode}.pt"))
        Path(out, f"history_{mode}.json").write_text(json.dumps(history))
    strategy.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
