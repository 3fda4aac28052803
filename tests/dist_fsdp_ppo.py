"""2-process FSDP PPO runs: ``torchrun --nproc_per_node=2 tests/dist_fsdp_ppo.py OUT [ZERO_STAGE]``.

Same tiny task as ``tests/dist_ppo.py`` (reward = share of "7" in the response). First full fine-tuning:
actor and critic sharded and trained, the frozen reference policy (a copy of the starting actor) sharded
too; rank 0 writes the per-episode scores to ``OUT/scores.json`` and the final models go to ``OUT/model``.
Then a short LoRA run (reference = the actor with adapters off) saving to ``OUT/lora/model``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coati.trainer.ppo import PPOTrainer  # noqa: E402
from coati.trainer.strategies import make_strategy  # noqa: E402
from tests import dist_ppo as h  # noqa: E402
from tests import tiny  # noqa: E402


def run(out: Path, zero_stage: int, lora: bool, episodes: int) -> list[float]:
    strategy = make_strategy("fsdp", seed=0, zero_stage=zero_stage)
    actor, critic = h.models(seed=0, lora_rank=8 if lora else 0)
    prompts, _ = h.loaders(strategy, experience_batch_size=8)  # 16 prompts per episode over both ranks
    trainer = PPOTrainer(strategy, actor, critic, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                         num_episodes=episodes, save_path=str(out / "model"),
                         **{**h.PPO_KW, "train_batch_size": 4})
    history = trainer.fit(prompts)
    if not lora:
        # ranks that stop generating early must keep joining the others' all-gathers (synced_gpus): count the
        # forward calls of one sharded layer while rank 0 asks for 2 new tokens and rank 1 for 6
        layer = trainer.actor.model.model.layers[0]
        calls = []
        handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
        batch = next(iter(prompts))
        new = 2 + 4 * strategy.rank
        seqs = trainer.actor.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=new,
                                      min_new_tokens=new, do_sample=True, pad_token_id=0)
        handle.remove()
        got = strategy.all_gather_object((seqs.shape[1] - batch["input_ids"].shape[1], len(calls)))
        if got != [(2, 6), (6, 6)]:
            raise AssertionError(f"(new tokens, layer forwards) per rank {got}, expected [(2, 6), (6, 6)]")
    return [m["critic/score/mean"] for m in history]


def main(out: str, zero_stage: int) -> None:
    strategy = make_strategy("fsdp", seed=0, zero_stage=zero_stage)
    try:  # sharded frozen models cannot be moved whole to the CPU
        PPOTrainer(strategy, *h.models(), tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                   offload_ref_reward=True, **h.PPO_KW)
    except ValueError as err:
        assert "--offload_ref_reward" in str(err) and "--cpu_offload" in str(err), err
    else:
        raise AssertionError("fsdp accepted offload_ref_reward")
    scores = run(Path(out), zero_stage, lora=False, episodes=20)
    run(Path(out, "lora"), zero_stage, lora=True, episodes=2)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out, "scores.json").write_text(json.dumps(scores))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
