"""vLLM rollouts on 2 processes (``torchrun --nproc_per_node=2 tests/dist_vllm.py STRATEGY MODE OUT``): one
in-process engine per rank on the tiny fp32 LLaMA of tests/test_vllm.py, a GRPO update, then each rank records
its engine's and HF generate's greedy tokens for its own prompts, before and after the sync, in
``OUT/rank{r}.json`` (tests/test_vllm_dist.py asserts on them).

MODE: ``full`` (full weights), ``lora_merge`` (a LoRA actor merged into the engine's weights), ``lora_adapter``
(the adapter served by vLLM's LoRA support) or ``broken`` (rank 1 syncs a state dict missing a tensor, then its
engine fails part way through loading the FSDP-sharded actor, then it stalls part way through past the sync
timeout, then rank 1 never arrives at a sync).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from coati.models import Actor, LoraSettings  # noqa: E402
from coati.rollout import HFRolloutEngine, VLLMEngine  # noqa: E402
from coati.rollout.vllm import full_weights  # noqa: E402
from coati.trainer.ppo import PPOTrainer  # noqa: E402
from coati.trainer.strategies import DDPStrategy, FSDPStrategy  # noqa: E402
from tests import dist_ppo as h  # noqa: E402
from tests import tiny  # noqa: E402

GREEDY = {"do_sample": False, "max_new_tokens": 8}
LORA_RANK = 4
BROKEN_TENSOR = "model.layers.1.mlp.down_proj.weight"
BROKEN_TIMEOUT_S = 10.0  # the sync timeout of the broken run
FAIL_AFTER = 3  # tensors rank 1's failing engine loads before it raises


def build_actor(lora: bool) -> Actor:
    torch.manual_seed(0)  # the same starting weights on every rank, LoRA or not (B = 0: the adapter is a no-op)
    config = tiny.llama_config(vocab_size=h.VOCAB, num_attention_heads=2, num_key_value_heads=1)
    return Actor.from_config(config, lora=LoraSettings(rank=LORA_RANK, alpha=8) if lora else None)


def main(strategy_name: str, mode: str, out: Path) -> None:
    strategy = (FSDPStrategy if strategy_name == "fsdp" else DDPStrategy)(seed=0)
    rank = strategy.rank
    path = out / "actor"
    if rank == 0:
        build_actor(lora=False).save_pretrained(path)
    strategy.barrier()
    actor = build_actor(lora=mode.startswith("lora")).eval()
    engine = VLLMEngine(path, eos_token_id=2, pad_token_id=0, dtype="float32", enforce_eager=True,
                        max_model_len=128, kv_cache_memory_bytes=32 << 20, seed=0,
                        sync_timeout_s=BROKEN_TIMEOUT_S if mode == "broken" else 60,
                        lora_rank=LORA_RANK if mode == "lora_adapter" else 0)
    record: dict = {"rank": rank}
    if mode == "broken":
        def attempt(case: str, weights, error: type[Exception]) -> None:
            """One sync expected to fail: its message, seconds and the engine's version after it."""
            t0 = time.perf_counter()
            try:
                engine.update_weights(weights)
            except error as e:
                record[f"{case}_error"] = str(e)
            record[f"{case}_s"] = time.perf_counter() - t0
            record[f"version_after_{case}"] = engine.weight_version

        def reload_then(then):
            """rank 1's engine takes FAIL_AFTER tensors of the stream, then does ``then(rest of the stream)``."""
            def reload(method, timeout=None, kwargs=None):
                tensors = iter(kwargs["weights_iterator"])
                for _ in range(FAIL_AFTER):
                    next(tensors)
                then(tensors)
            return reload

        def broke(tensors):
            raise RuntimeError("the engine broke")

        def stall(tensors):
            time.sleep(BROKEN_TIMEOUT_S * 1.5)
            for _ in tensors:
                pass

        state = full_weights(actor)
        if rank == 1:
            del state[BROKEN_TENSOR]
        attempt("missing", state, ValueError)
        # rank 1's engine fails while loading the sharded actor's stream: rank 0 keeps all-gathering to the end
        # (rank 1 still takes part), then both raise naming rank 1 and the tensor
        sharded = strategy.prepare_model(actor)
        if rank == 1:
            engine.llm.collective_rpc = reload_then(broke)
        attempt("load", sharded, ValueError)
        # rank 1 stalls inside the stream past the sync timeout: rank 0's all-gather of the next tensor fails
        # within the sync timeout (not the training group's 30 minutes), and so does rank 1's when it resumes
        if rank == 1:
            engine.llm.collective_rpc = reload_then(stall)
        attempt("stall", sharded, RuntimeError)
        if rank == 0:  # rank 1 never comes: rank 0 must give up after the timeout, not wait
            attempt("absent", sharded, RuntimeError)
        else:
            time.sleep(BROKEN_TIMEOUT_S * 1.5)
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        return

    prompts = h.loaders(strategy, experience_batch_size=4)[0]
    batch = next(iter(prompts))  # this rank's prompts

    def greedy(engine_) -> list[list[int]]:
        return engine_.generate(batch["input_ids"], batch["attention_mask"], GREEDY).sequences.tolist()

    record["vllm_before"] = greedy(engine)
    record["hf_before"] = greedy(HFRolloutEngine(actor, eos_token_id=2, pad_token_id=0))
    trainer = PPOTrainer(strategy, actor, None, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                         engine=engine, algo="grpo", n_samples_per_prompt=2, num_episodes=1, kl_coef=0.0, lr=3e-2,
                         num_collect_steps=1, num_update_steps=1, max_epochs=1, train_batch_size=8, max_new_tokens=8,
                         rollout_engine="vllm", save_path=str(out / "run"), log_interval=1000)
    history = trainer.fit(prompts)
    trained = strategy.unwrap(trainer.actor).eval()
    record["hf_after"] = greedy(HFRolloutEngine(trained, eos_token_id=2, pad_token_id=0))  # FSDP: every rank
    record["vllm_after"] = greedy(engine)
    record["version"] = engine.weight_version
    one = {"input_ids": torch.tensor([[1, 40, 41, 42]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    sampled = engine.generate(one["input_ids"], one["attention_mask"], {"do_sample": True, "max_new_tokens": 16})
    record["sampled_same_prompt"] = sampled.sequences.tolist()  # seeded per rank: differs between ranks
    # a second sync of other weights: the engine must follow again (a stale adapter would keep the first)
    torch.manual_seed(1)  # the same noise on every rank: each adds it to its own shard
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(torch.randn_like(local) * 0.5)
    trainer.experience_maker.update_weights(trainer.actor, version=trainer.optim_step + 1)
    record["hf_again"] = greedy(HFRolloutEngine(trained, eos_token_id=2, pad_token_id=0))
    record["vllm_again"] = greedy(engine)
    record["version_again"] = engine.weight_version
    record["optim_step"] = trainer.optim_step
    record["sync_s"] = history[-1]["timing_s/weight_sync"]
    record["logprob_diff_max"] = history[-1]["rollout/logprob_diff/max"]
    record["prompts"] = batch["input_ids"].tolist()
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
