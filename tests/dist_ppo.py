"""PPO test helpers, and the 2-process DDP PPO runs (``torchrun --nproc_per_node=2 tests/dist_ppo.py OUT``).

The tiny policy is a LLaMA with a 64-token vocabulary: ids 3..63 of the LLaMA tokenizer are the byte tokens
0x00..0x3C, so responses decode to text (``"7"`` is id 58) and sampling is fast. The reward is the share
of ``"7"`` characters in the response; a random policy scores about 1/64.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coati.dataset import PromptCollator, SFTCollator  # noqa: E402
from coati.models import Actor, Critic, LoraSettings  # noqa: E402
from tests import tiny  # noqa: E402

VOCAB = 64
TARGET = "7"
TARGET_ID = 58  # <0x37>


def config():
    return tiny.llama_config(vocab_size=VOCAB)


def target_share(prompts, responses, **extras):
    return [r.count(TARGET) / max(len(r), 1) for r in responses]


def models(seed: int = 0, lora_rank: int = 0):
    torch.manual_seed(seed)
    lora = LoraSettings(rank=lora_rank, alpha=lora_rank) if lora_rank else None
    actor = Actor.from_config(config(), lora=lora)
    critic = Critic.from_config(config())
    return actor, critic


def prompt_data(n: int = 64, seed: int = 0) -> list[dict]:
    tok = tiny.tokenizer("llama")
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        items.append({"input_ids": torch.cat([torch.tensor([1]), ids]), "prompt": tok.decode(ids)})
    return items


def pretrain_data(n: int = 32, seed: int = 1) -> list[dict]:
    """Documents made only of the digit '3' and spaces: a clear LM target for PPO-ptx."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(6, 12, (1,), generator=g))
        ids = torch.where(torch.rand(length, generator=g) < 0.7, torch.tensor(54), torch.tensor(35))
        ids = torch.cat([torch.tensor([1]), ids, torch.tensor([2])])
        labels = ids.clone()
        labels[0] = -100
        items.append({"input_ids": ids, "labels": labels})
    return items


def loaders(strategy, experience_batch_size: int = 16, ptx_batch_size: int = 4, with_pretrain: bool = False):
    prompts = strategy.setup_dataloader(prompt_data(), experience_batch_size, shuffle=True,
                                        collate_fn=PromptCollator(0))
    pretrain = None
    if with_pretrain:
        pretrain = strategy.setup_dataloader(pretrain_data(), ptx_batch_size, shuffle=True, drop_last=True,
                                             collate_fn=SFTCollator(0))
    return prompts, pretrain


PPO_KW = dict(kl_coef=0.01, lr=1e-3, critic_lr=1e-3, num_collect_steps=1, num_update_steps=1, max_epochs=2,
              train_batch_size=8, max_new_tokens=8, log_interval=1000)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def same_prompt_responses(strategy) -> list[str]:
    """One episode on a dataset of one prompt repeated, so both ranks get the same prompts: the responses
    this rank sampled."""
    from coati.trainer.ppo import PPOTrainer

    actor, critic = models(seed=0)
    loader = strategy.setup_dataloader(prompt_data(1) * 16, 8, shuffle=True, collate_fn=PromptCollator(0))
    trainer = PPOTrainer(strategy, actor, critic, tokenizer=tiny.tokenizer("llama"), reward_fn=target_share,
                         num_episodes=1, **PPO_KW)
    responses: list[str] = []
    make = trainer.experience_maker.make_experience

    def recording(batch):
        exp = make(batch)
        responses.extend(trainer.experience_maker.decode_responses(exp.sequences, exp.action_mask))
        return exp

    trainer.experience_maker.make_experience = recording
    trainer.fit(loader)
    return responses


def main(out: str) -> None:
    from coati.trainer.ppo import PPOTrainer
    from coati.trainer.strategies import DDPStrategy

    strategy = DDPStrategy(seed=0)
    same_prompt = same_prompt_responses(strategy)
    actor, critic = models(seed=0)
    initial = weights_digest(actor)
    prompts, pretrain = loaders(strategy, experience_batch_size=8, ptx_batch_size=2, with_pretrain=True)
    trainer = PPOTrainer(strategy, actor, critic, tokenizer=tiny.tokenizer("llama"), reward_fn=target_share,
                         ptx_coef=0.5, num_episodes=3, accumulation_steps=2, **{**PPO_KW, "train_batch_size": 4})
    seen_prompts = []
    make = trainer.experience_maker.make_experience

    def recording(batch):
        seen_prompts.extend(batch["prompts"])
        return make(batch)

    trainer.experience_maker.make_experience = recording
    history = trainer.fit(prompts, pretrain)
    record = {
        "rank": strategy.rank, "world_size": strategy.world_size, "initial": initial,
        "actor": weights_digest(strategy.unwrap(trainer.actor)),
        "critic": weights_digest(strategy.unwrap(trainer.critic)),
        "prompts": seen_prompts, "optim_steps": trainer.optim_step, "same_prompt_responses": same_prompt,
        "ptx_loss": history[-1]["actor/ptx_loss"], "score": [h["critic/score/mean"] for h in history],
    }
    Path(out, f"rank{strategy.rank}.json").write_text(json.dumps(record))
    strategy.barrier()


def record_steps(trainer):
    """Metrics of every actor and critic optimizer step, in order (the trainer only logs episode means)."""
    steps = []
    for name in ("_actor_step", "_critic_step"):
        def recording(group, step=getattr(trainer, name)):
            steps.append(step(group))
            return steps[-1]

        setattr(trainer, name, recording)
    return steps


if __name__ == "__main__":
    main(sys.argv[1])
