"""vLLM as the rollout engine (coati.rollout.vllm), and the rollout-correction math (coati.rl.rollout_is).

The engine tests need vLLM (``pip install 'coati[vllm]'``; CI runs them in a venv of their own, see ``.ci/run``) and
skip without it; the math tests run everywhere. One in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on a
tiny fp32 LLaMA serves the module's engine tests, in order.
"""
import importlib.util
import json
import math
import os
import sys
import types

import pytest
import torch

from coati.errors import UsageError
from coati.rl import ROLLOUT_IS, logprob_diff_stats, rollout_is_weights, rollout_outliers
from coati.rl.losses import ppo_clip_loss

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install 'coati[vllm]')")
GREEDY = {"do_sample": False, "max_new_tokens": 8}
# fp32 on both sides: the same tokens' log-probs agree to float rounding (different kernels sum differently)
LOGPROB_ATOL = 1e-4


# ----- rollout correction: each weight equals its formula -------------------------------------------------------
def _lp():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.1, -4.0, -1.0]])
    eng = torch.tensor([[-1.2, -1.0, -0.5, 0.0], [-0.3, -0.2, -1.0, -2.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return old, eng, mask


def test_token_is_is_the_truncated_ratio_per_token():
    old, eng, mask = _lp()
    w = ROLLOUT_IS["token"](old, eng, mask, cap=2.0)
    want = [[min(math.exp(-1.0 + 1.2), 2), min(math.exp(-2.0 + 1.0), 2), 1.0, 0.0],
            [1.0, min(math.exp(0.1), 2), min(math.exp(-3.0), 2), min(math.exp(1.0), 2)]]
    torch.testing.assert_close(w, torch.tensor(want), atol=1e-6, rtol=0)


def test_sequence_is_is_the_truncated_product_of_ratios():
    old, eng, mask = _lp()
    w = ROLLOUT_IS["sequence"](old, eng, mask, cap=2.0)
    s0 = min(math.exp((-1.0 + 1.2) + (-2.0 + 1.0) + 0.0), 2.0)  # the masked 4th token does not count
    s1 = min(math.exp(0.0 + 0.1 - 3.0 + 1.0), 2.0)
    torch.testing.assert_close(w, torch.tensor([[s0, s0, s0, 0.0], [s1] * 4]), atol=1e-6, rtol=0)
    assert ROLLOUT_IS["off"](old, eng, mask) is None


def test_outlier_sequences_are_masked_by_their_geometric_mean_ratio():
    old, eng, mask = _lp()
    geo = [(0.2 - 1.0 + 0.0) / 3, (0.0 + 0.1 - 3.0 + 1.0) / 4]  # -0.267, -0.475
    assert rollout_outliers(old, eng, mask, 1.5).tolist() == [abs(g) > math.log(1.5) for g in geo]  # [F, T]
    w = rollout_is_weights("token", old, eng, mask, cap=2.0, mask_threshold=1.5)
    torch.testing.assert_close(w, ROLLOUT_IS["token"](old, eng, mask, cap=2.0) * torch.tensor([[1.0], [0.0]]))
    only_mask = rollout_is_weights("off", old, eng, mask, mask_threshold=1.5)
    torch.testing.assert_close(only_mask, torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0]]))
    assert rollout_is_weights("off", old, eng, mask) is None


def test_logprob_diff_stats_and_weighted_policy_loss():
    old, eng, mask = _lp()
    stats = logprob_diff_stats(old, eng, mask, threshold=0.5)
    torch.testing.assert_close(stats["logprob_diff"], torch.tensor([(0.2 + 1.0) / 3, (0.1 + 3.0 + 1.0) / 4]))
    torch.testing.assert_close(stats["logprob_diff_max"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(stats["logprob_diff_over"], torch.tensor([1 / 3, 2 / 4]))
    # the weights multiply each token's clipped surrogate before aggregation
    new = old + 0.05
    adv = torch.tensor([[1.0, -1.0, 0.5, 0.0], [2.0, 1.0, -1.0, 0.3]])
    w = ROLLOUT_IS["token"](old, eng, mask, cap=2.0)
    got, _ = ppo_clip_loss(new, old, adv, mask, clip_low=0.2, agg_mode="token_mean", is_weights=w)
    ratio = math.exp(0.05)
    want = (-(ratio * adv) * w * mask).sum() / mask.sum()
    torch.testing.assert_close(got, want)


def test_rollout_is_needs_the_vllm_engine():
    from coati.rl import make_config

    with pytest.raises(UsageError, match="--rollout_engine vllm"):
        make_config(rollout_is="token")
    assert make_config(rollout_engine="vllm", rollout_is="sequence").rollout_is == "sequence"


def test_without_vllm_one_line_names_the_extra(monkeypatch):
    from coati.rollout.vllm import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(UsageError, match=r"coati\[vllm\]"):
        import_vllm()


# ----- the engine ----------------------------------------------------------------------------------------------
def _config():
    """dist_ppo's tiny LLaMA with head_dim 32 (vLLM's CPU attention has no 16), its output head tied to the
    embeddings as in most small published checkpoints."""
    from tests import dist_ppo as h
    from tests import tiny

    return tiny.llama_config(vocab_size=h.VOCAB, num_attention_heads=2, num_key_value_heads=1,
                             tie_word_embeddings=True)


def test_a_4bit_lora_actors_sync_tensors_are_the_weights_it_computes_with(tmp_path):
    """What a --quant actor sends (no vLLM needed to check it): the plain checkpoint's names and full shapes,
    NF4 weights dequantized and the adapter merged, so a plain model loaded with them gives the actor's logits."""
    pytest.importorskip("bitsandbytes")
    from coati.models import Actor, LoraSettings
    from coati.models.quant import bnb_layers
    from coati.rollout.vllm import full_weights, weight_entries

    torch.manual_seed(0)
    Actor.from_config(_config()).save_pretrained(tmp_path)
    actor = Actor.from_pretrained(tmp_path, lora=LoraSettings(rank=4, alpha=8), quant="4bit",
                                  quant_compute_dtype="float32").eval()
    assert len(list(bnb_layers(actor.model))) >= 8
    with torch.no_grad():
        for name, p in actor.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    plain = Actor.from_config(_config()).eval()
    own = plain.model.state_dict()
    assert {e.name: e.shape for e in weight_entries(actor)} == {k: tuple(v.shape) for k, v in own.items()}
    plain.model.load_state_dict(full_weights(actor))
    ids = torch.randint(3, 60, (2, 12))
    with torch.no_grad():
        assert torch.allclose(plain.model(ids).logits, actor.model(ids).logits, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (pip install 'coati[vllm]')")
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the engine keeps itself in this process
    from coati.rollout.vllm import VLLMEngine
    from coati.trainer.strategies import NaiveStrategy
    from tests import dist_ppo as h

    from coati.models import Actor

    path = tmp_path_factory.mktemp("vllm") / "actor"
    torch.manual_seed(0)
    actor = Actor.from_config(_config()).eval()
    actor.save_pretrained(path)
    # an explicit KV cache: vLLM's CPU default reserves half the machine's memory, refused when others use it
    engine = VLLMEngine(path, eos_token_id=2, pad_token_id=0, dtype="float32", enforce_eager=True,
                        max_model_len=128, kv_cache_memory_bytes=32 << 20, seed=0)
    batch = next(iter(h.loaders(NaiveStrategy(seed=0), experience_batch_size=4)[0]))
    return engine, actor, batch, path


def _hf(actor, batch, sampling):
    from coati.rollout import HFRolloutEngine

    return HFRolloutEngine(actor, eos_token_id=2, pad_token_id=0).generate(batch["input_ids"],
                                                                            batch["attention_mask"], sampling)


@needs_vllm
def test_sampled_log_probs_equal_the_trainers_in_fp32(setup):
    engine, actor, batch, _ = setup
    torch.manual_seed(0)
    sampling = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "max_new_tokens": 8}
    out = engine.generate(batch["input_ids"], batch["attention_mask"], sampling)
    assert out.weight_version == 0 and out.log_probs is None
    with torch.no_grad():
        trainer = actor(out.sequences, out.attention_mask, num_actions=out.num_actions, temperature=0.7)
    diff = ((trainer - out.engine_log_probs) * out.action_mask).abs().max()
    assert diff < LOGPROB_ATOL, f"max |trainer - vLLM| log-prob {diff:.3g}"
    greedy = engine.generate(batch["input_ids"], batch["attention_mask"], GREEDY)
    with torch.no_grad():
        trainer = actor(greedy.sequences, greedy.attention_mask, num_actions=greedy.num_actions)
    assert ((trainer - greedy.engine_log_probs) * greedy.action_mask).abs().max() < LOGPROB_ATOL


@needs_vllm
def test_broken_sync_raises_naming_the_tensor(setup):
    engine, actor, _, _ = setup
    state = dict(actor.model.state_dict())
    missing = dict(state)
    del missing["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' is missing"):
        engine.update_weights(missing)
    wrong = {**state, "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 64)}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(3, 64\)"):
        engine.update_weights(wrong)
    with pytest.raises(ValueError, match=r"'extra\.weight' is not in"):
        engine.update_weights({**state, "extra.weight": torch.zeros(2)})
    assert engine.weight_version == 0  # nothing was sent


@needs_vllm
def test_after_a_grpo_update_vllm_greedy_equals_hf_generate(setup, tmp_path):
    from coati.trainer.ppo import PPOTrainer
    from coati.trainer.strategies import NaiveStrategy
    from tests import dist_ppo as h
    from tests import tiny

    engine, actor, batch, _ = setup
    before = engine.generate(batch["input_ids"], batch["attention_mask"], GREEDY)
    assert torch.equal(before.sequences, _hf(actor, batch, GREEDY).sequences)  # same starting weights
    strategy = NaiveStrategy(seed=0)
    prompts = h.loaders(strategy, experience_batch_size=4)[0]
    trainer = PPOTrainer(strategy, actor, None, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                         engine=engine, algo="grpo", n_samples_per_prompt=2, num_episodes=1, kl_coef=0.0, lr=3e-2,
                         num_collect_steps=1, num_update_steps=1, max_epochs=1, train_batch_size=8, max_new_tokens=8,
                         rollout_engine="vllm", rollout_is="token", save_path=str(tmp_path), log_interval=1000)
    history = trainer.fit(prompts)
    actor.eval()
    assert engine.weight_version == trainer.optim_step == 1
    hf_after = _hf(actor, batch, GREEDY).sequences
    assert not torch.equal(hf_after, before.sequences), "the update did not change the greedy output"
    after = engine.generate(batch["input_ids"], batch["attention_mask"], GREEDY)
    assert torch.equal(after.sequences, hf_after)  # token for token after the sync
    assert after.weight_version == 1
    sampled = engine.generate(batch["input_ids"], batch["attention_mask"], {**GREEDY, "do_sample": True})
    with torch.no_grad():  # every synced weight, the tied output head included: the same log-probs
        trainer_lp = actor(sampled.sequences, sampled.attention_mask, num_actions=sampled.num_actions)
    torch.testing.assert_close(sampled.engine_log_probs * sampled.action_mask, trainer_lp * sampled.action_mask,
                               atol=LOGPROB_ATOL, rtol=0)
    metrics = history[-1]
    assert metrics["timing_s/weight_sync"] > 0 and metrics["rollout/logprob_diff/max"] < LOGPROB_ATOL
    assert 0 <= metrics["rollout/logprob_diff/mean"] < LOGPROB_ATOL
    assert metrics["rollout/is_weight/mean"] == pytest.approx(1.0, abs=1e-3)
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert rows and all(r["weight_version"] == 0 for r in rows)  # episode 1 sampled the starting weights
    # a rollout from weights older than the trainer's raises
    trainer.experience_maker.weight_version = 2
    with pytest.raises(RuntimeError, match="weight version 1, the trainer is at 2"):
        trainer.experience_maker.make_experience(batch)


@needs_vllm
def test_repetition_penalty_and_min_new_tokens_map_to_vllm(setup):
    engine, actor, batch, _ = setup  # in sync after the GRPO test, and in sync when run alone
    engine.update_weights(actor, version=engine.weight_version)
    sampling = {**GREEDY, "repetition_penalty": 1.5, "min_new_tokens": 4}
    got = engine.generate(batch["input_ids"], batch["attention_mask"], sampling)
    assert torch.equal(got.sequences, _hf(actor, batch, sampling).sequences)
    assert bool((got.action_mask.sum(-1) >= 4).all())


@needs_vllm
def test_a_lora_actor_syncs_merged(setup):
    from coati.models import Actor, LoraSettings

    engine, _, batch, _ = setup
    torch.manual_seed(1)
    lora = Actor.from_config(_config(), lora=LoraSettings(rank=4, alpha=8)).eval()
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    version = engine.weight_version + 1
    engine.update_weights(lora, version=version)
    got = engine.generate(batch["input_ids"], batch["attention_mask"], GREEDY)
    assert got.weight_version == version
    assert torch.equal(got.sequences, _hf(lora, batch, GREEDY).sequences)
    with torch.no_grad():
        trainer = lora(got.sequences, got.attention_mask, num_actions=got.num_actions)
    assert ((trainer - got.engine_log_probs) * got.action_mask).abs().max() < LOGPROB_ATOL


@needs_vllm
@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_a_quantized_lora_actor_syncs_dequantized_and_merged(setup, quant):
    """A --quant actor computes with its quantized base, not the checkpoint the engine started from: after a sync
    of the dequantized, merged weights the engine's log-probs equal the trainer's for NF4, whose matmul runs on
    the dequantized weight. LLM.int8 also rounds the trainer's activations to int8, which the engine's
    full-precision matmul does not: the gap stays at that rounding (about 1e-3 here, what
    rollout/logprob_diff reports and --rollout_is corrects)."""
    pytest.importorskip("bitsandbytes")
    from coati.models import Actor, LoraSettings
    from coati.models.quant import bnb_layers

    engine, _, batch, path = setup
    torch.manual_seed(2)
    actor = Actor.from_pretrained(path, lora=LoraSettings(rank=4, alpha=8), quant=quant,
                                  quant_compute_dtype="float32").eval()
    assert len(list(bnb_layers(actor.model))) >= 8  # the base really is quantized
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in actor.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)

    def gap() -> float:
        out = engine.generate(batch["input_ids"], batch["attention_mask"], GREEDY)
        with torch.no_grad():
            trainer = actor(out.sequences, out.attention_mask, num_actions=out.num_actions)
        return float(((trainer - out.engine_log_probs) * out.action_mask).abs().max())

    engine.update_weights(setup[1])  # the checkpoint's full-precision weights
    before = gap()
    version = engine.weight_version + 1
    engine.update_weights(actor, version=version)
    assert engine.generate(batch["input_ids"], batch["attention_mask"], GREEDY).weight_version == version
    after = gap()
    if quant == "4bit":
        assert after < LOGPROB_ATOL < before, (before, after)
        got = engine.generate(batch["input_ids"], batch["attention_mask"], GREEDY)
        assert torch.equal(got.sequences, _hf(actor, batch, GREEDY).sequences)
    else:
        assert after < 1e-2 and after < before / 100, (before, after)


@needs_vllm
def test_the_engine_keeps_vllm_in_this_process(setup, monkeypatch):
    """Syncs stream tensors into the workers, which vLLM's multiprocess client cannot carry: the engine (started
    with the variable unset) set it to 0, and a run that asks for multiprocessing is refused in one line."""
    from coati.rollout.vllm import VLLMEngine

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(UsageError, match="unset VLLM_ENABLE_V1_MULTIPROCESSING"):
        VLLMEngine(setup[3], eos_token_id=2, pad_token_id=0)


@needs_vllm
def test_vllm_sleep_is_refused_without_a_gpu(setup):
    from coati.rollout.vllm import VLLMEngine

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="needs a GPU"):
        VLLMEngine(setup[3], eos_token_id=2, pad_token_id=0, sleep=True)


@needs_vllm
def test_sampling_without_a_temperature_samples_at_temperature_1(setup):
    params = setup[0].sampling_params({"do_sample": True, "max_new_tokens": 4})  # HF's GenerationConfig: None
    assert params.temperature == 1.0 and setup[0].sampling_params(GREEDY).temperature == 0.0


@needs_vllm
def test_unsupported_generation_settings_are_refused(setup):
    with pytest.raises(ValueError, match="num_beams"):
        setup[0].sampling_params({**GREEDY, "num_beams": 2})


def _train_prompts():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_prompts.py"
    spec = importlib.util.spec_from_file_location("coati_train_prompts_vllm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_prompts_main():
    return _train_prompts().main


def test_train_prompts_hands_its_engine_flags_to_the_vllm_engine(monkeypatch):
    """Each --vllm_* knob reaches VLLMEngine; left out, it is RLConfig's default, which is VLLMEngine's too."""
    import inspect

    import coati.rollout.vllm as rollout_vllm
    from coati.trainer.strategies import NaiveStrategy

    script = _train_prompts()
    defaults = {name: p.default for name, p in inspect.signature(rollout_vllm.VLLMEngine).parameters.items()}
    seen: dict = {}
    monkeypatch.setattr(rollout_vllm, "VLLMEngine", lambda path, **kw: seen.update(kw, path=path))
    actor = torch.nn.Linear(2, 2)
    tok = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
    base = ["--pretrain", "some/dir", "--prompt_dataset", "p.jsonl", "--rollout_engine", "vllm"]
    script.build_engine(script.build_parser().parse_args(
        [*base, "--vllm_sync_timeout_s", "42", "--vllm_gpu_memory_utilization", "0.3"]), tok, NaiveStrategy(), actor)
    assert (seen["sync_timeout_s"], seen["gpu_memory_utilization"], seen["path"]) == (42.0, 0.3, "some/dir")
    script.build_engine(script.build_parser().parse_args(base), tok, NaiveStrategy(), actor)
    for name in ("sync_timeout_s", "gpu_memory_utilization", "tensor_parallel_size", "sleep"):
        assert seen[name] == defaults[name], name


@pytest.mark.parametrize("flags, message", [
    (["--vllm_sleep"], "--vllm_sleep .* needs --rollout_engine vllm"),
    (["--rollout_is", "token"], "--rollout_is .* need --rollout_engine vllm"),
    (["--rollout_engine", "vllm", "--vllm_sleep"], "needs a GPU" if not torch.cuda.is_available() else None),
    (["--rollout_engine", "vllm"], r"pip install 'coati\[vllm\]'" if not HAS_VLLM else "local checkpoint dir"),
    (["--vllm_lora", "adapter"], "--vllm_lora adapter .* needs --rollout_engine vllm"),
    (["--stop", "</answer>", ""], "--stop: an empty stop string"),
    (["--rollout_engine", "vllm", "--vllm_lora", "adapter", "--lora_rank", "4", "--lora_train_bias", "all"],
     r"pip install 'coati\[vllm\]'" if not HAS_VLLM else "--lora_train_bias all trains biases it cannot carry"),
    (["--rollout_engine", "vllm", "--vllm_lora", "adapter", "--lora_rank", "4", "--quant", "4bit"],
     r"pip install 'coati\[vllm\]'" if not HAS_VLLM else "not the --quant 4bit one the actor computes with"),
])
def test_train_prompts_refuses_bad_engine_flags_before_training(flags, message, tmp_path):
    if message is None:
        pytest.skip("a GPU is present")
    argv = ["--pretrain", str(tmp_path / "no_model_here"), "--prompt_dataset", str(tmp_path / "none.jsonl"),
            "--reward_fn", "tests/dist_ppo.py:target_share", *flags]
    with pytest.raises(UsageError, match=message):
        _train_prompts_main()(argv)
