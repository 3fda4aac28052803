"""The rollout engine seam: HF generate behind RolloutEngine, weight updates that raise instead of going stale, and
experience making / the trainer going through whatever engine they are given."""
import pytest
import torch

from coati.models.generation import generate_with_masks
from coati.rollout import HFRolloutEngine, Rollout, RolloutEngine
from coati.rollout.base import stop_length
from coati.trainer.ppo import PPOTrainer
from coati.trainer.strategies import NaiveStrategy
from tests import dist_ppo as h
from tests import tiny

SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0, "max_new_tokens": 6}


def _prompts():
    return next(iter(h.loaders(NaiveStrategy(seed=0), experience_batch_size=4)[0]))


def test_hf_engine_returns_generate_tokens_and_their_tempered_log_probs():
    actor = h.models(seed=0)[0].eval()
    batch = _prompts()
    engine = HFRolloutEngine(actor, eos_token_id=2, pad_token_id=0)
    assert isinstance(engine, RolloutEngine)
    torch.manual_seed(3)
    got = engine.generate(batch["input_ids"], batch["attention_mask"], SAMPLING)
    torch.manual_seed(3)
    seqs, mask, action_mask = generate_with_masks(actor, batch["input_ids"], batch["attention_mask"], eos_token_id=2,
                                                  pad_token_id=0, **SAMPLING)
    n = action_mask.size(1)
    seqs[:, -n:].masked_fill_(action_mask.eq(0), 0)  # padding after EOS
    assert torch.equal(got.sequences, seqs) and torch.equal(got.attention_mask, mask)
    assert torch.equal(got.action_mask, action_mask)
    with torch.no_grad():
        logits = actor.model(input_ids=seqs, attention_mask=mask).logits[:, -n - 1:-1] / 0.7
    want = torch.log_softmax(logits.float(), -1).gather(-1, seqs[:, -n:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.log_probs, want, atol=1e-5, rtol=0)
    assert engine.generate(batch["input_ids"], batch["attention_mask"], SAMPLING, return_log_probs=False).log_probs \
        is None


def test_hf_engine_samples_and_scores_what_plain_generate_gives():
    """The engine drops finished rows while it samples; its tokens and rollout log-probs are those of
    transformers' plain ``generate`` for the same seed, with rows ending at EOS mid-batch."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class EosBias(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores + 2.0 * (torch.arange(scores.size(-1)) == 2)

    actor = h.models(seed=0)[0].eval()
    batch = _prompts()
    sampling = dict(SAMPLING, max_new_tokens=12, logits_processor=LogitsProcessorList([EosBias()]))
    engine = HFRolloutEngine(actor, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(3)
    got = engine.generate(batch["input_ids"], batch["attention_mask"], sampling)
    lengths = got.action_mask.sum(1)
    assert lengths.max() == 12 and len(set(lengths.tolist())) > 2  # rows end at EOS while others go on
    torch.manual_seed(3)
    config = GenerationConfig(eos_token_id=2, pad_token_id=0)
    extra = config.update(**sampling)
    seqs = actor.generate(batch["input_ids"], batch["attention_mask"], generation_config=config, **extra)
    n = seqs.size(1) - batch["input_ids"].size(1)
    assert torch.equal(got.sequences, seqs)  # pad (0) after EOS in both
    with torch.no_grad():
        want = actor(seqs, got.attention_mask, num_actions=n, temperature=0.7).float()
    assert torch.equal(got.log_probs, want)


def test_hf_engine_weight_updates_apply_or_raise():
    actor, other = h.models(seed=0)[0].eval(), h.models(seed=1)[0].eval()
    engine = HFRolloutEngine(actor, eos_token_id=2, pad_token_id=0)
    engine.update_weights(actor)  # its own module: already current
    with pytest.raises(ValueError, match="another"):
        engine.update_weights(other)
    with pytest.raises(ValueError, match="keys"):
        engine.update_weights({"not.a.weight": torch.zeros(1)})
    engine.update_weights(other.state_dict())  # another policy's weights are copied in
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(actor.model(input_ids=ids).logits, other.model(input_ids=ids).logits)


class ScriptedEngine:
    """A RolloutEngine that answers every prompt with the same tokens (the seam another engine plugs into)."""

    def __init__(self, tokens):
        self.tokens, self.updates = tokens, []

    def generate(self, input_ids, attention_mask, sampling, *, return_log_probs=True):
        b = input_ids.size(0)
        actions = torch.tensor([self.tokens] * b)
        action_mask = torch.ones_like(actions, dtype=attention_mask.dtype)
        log_probs = torch.full(actions.shape, -1.5) if return_log_probs else None
        return Rollout(torch.cat([input_ids, actions], 1), torch.cat([attention_mask, action_mask], 1), action_mask,
                       log_probs)

    def update_weights(self, weights):
        self.updates.append(weights)


def test_experience_making_and_the_trainer_go_through_the_given_engine():
    actor, _ = h.models(seed=0)
    strategy = NaiveStrategy(seed=0)
    prompts = h.loaders(strategy, experience_batch_size=4)[0]
    trainer = PPOTrainer(strategy, actor, None, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                         algo="rloo", n_samples_per_prompt=2, num_episodes=2, **h.PPO_KW)
    engine = ScriptedEngine([h.TARGET_ID, h.TARGET_ID, 9])  # "77" and byte 0x06: 2 of 3 characters are 7
    trainer.experience_maker.engine = engine
    exp = trainer.experience_maker.make_experience(next(iter(prompts)))
    assert exp.sequences[:, -3:].tolist() == [[h.TARGET_ID, h.TARGET_ID, 9]] * 8
    assert exp.info["score"].tolist() == pytest.approx([2 / 3] * 8) and torch.all(exp.action_log_probs == -1.5)
    trainer.fit(prompts)
    assert len(engine.updates) == 2 and all(w is trainer.actor for w in engine.updates)  # once per episode


class VersionedEngine(ScriptedEngine):
    """Stamps its rollouts with the weight version it holds, as the vLLM engine does."""

    weight_version, fail = 0, False

    def generate(self, input_ids, attention_mask, sampling, *, return_log_probs=True):
        rollout = super().generate(input_ids, attention_mask, sampling, return_log_probs=return_log_probs)
        rollout.weight_version = self.weight_version
        return rollout

    def update_weights(self, weights, version=None):
        if self.fail:
            raise RuntimeError("the sync failed")
        self.weight_version = self.weight_version + 1 if version is None else version


def test_the_maker_expects_the_version_the_engine_holds_after_each_sync():
    """A sync without a version (the engine counts on) and a failed sync (the engine keeps its weights) leave
    the maker expecting exactly the engine's version: no false 'missed a weight sync', no stale rollout taken."""
    actor, _ = h.models(seed=0)
    strategy = NaiveStrategy(seed=0)
    batch = next(iter(h.loaders(strategy, experience_batch_size=4)[0]))
    trainer = PPOTrainer(strategy, actor, None, tokenizer=tiny.tokenizer("llama"), reward_fn=h.target_share,
                         algo="rloo", n_samples_per_prompt=2, num_episodes=1, **h.PPO_KW)
    maker = trainer.experience_maker
    maker.engine = engine = VersionedEngine([h.TARGET_ID, 9])
    maker.update_weights(actor)
    assert maker.weight_version == engine.weight_version == 1
    maker.make_experience(batch)
    maker.update_weights(actor, version=5)
    engine.fail = True
    with pytest.raises(RuntimeError, match="the sync failed"):
        maker.update_weights(actor, version=6)
    assert maker.weight_version == 5
    maker.make_experience(batch)
    engine.weight_version = 4  # an engine that fell behind is still caught
    with pytest.raises(RuntimeError, match="missed a weight sync"):
        maker.make_experience(batch)


def test_stop_length_is_the_shortest_prefix_whose_text_holds_a_stop_string():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731 - one character per token
    text = [ord(c) for c in "ab</x>cd</x>"]
    assert stop_length(text, ["</x>"], decode) == 6  # the '>' completing the first one
    assert stop_length(text, ["cd", "b<"], decode) == 3  # whichever stop string completes first
    assert stop_length(text, ["zz"], decode) is None and stop_length([], ["a"], decode) is None
    # a stop string the tokenizer spells across tokens: completed by the second token, whatever it holds after
    pieces = {1: "An", 2: "swer:", 3: " 4"}
    assert stop_length([1, 2, 3], ["nswer"], lambda ids: "".join(pieces[i] for i in ids)) == 2


def test_the_maker_cuts_any_engines_responses_at_a_stop_string():
    """Stop strings act on the engine's rollout (HF's or vLLM's alike): the tokens after the completing one become
    padding, out of the score, the masks and the clipped count; a response without one is untouched."""
    actor, _ = h.models(seed=0)
    strategy = NaiveStrategy(seed=0)
    prompts = h.loaders(strategy, experience_batch_size=4)[0]
    tok = tiny.tokenizer("llama")
    stop = tok.decode([9])
    trainer = PPOTrainer(strategy, actor, None, tokenizer=tok, reward_fn=h.target_share, algo="rloo",
                         n_samples_per_prompt=2, num_episodes=1, stop=(stop,), **h.PPO_KW)
    maker = trainer.experience_maker
    maker.engine = ScriptedEngine([h.TARGET_ID, 9, h.TARGET_ID, h.TARGET_ID])
    exp = maker.make_experience(next(iter(prompts)))
    assert exp.action_mask.tolist() == [[1, 1, 0, 0]] * 8
    assert exp.sequences[:, -4:].tolist() == [[h.TARGET_ID, 9, 0, 0]] * 8  # padding after the stop
    assert exp.attention_mask[:, -4:].tolist() == [[1, 1, 0, 0]] * 8
    assert exp.info["score"].tolist() == pytest.approx([1 / 2] * 8)  # "7" + the stop: 1 of 2 characters is 7
    assert exp.info["response_length"].tolist() == [2.0] * 8 and exp.info["response_clipped"].tolist() == [0.0] * 8
    maker.engine = ScriptedEngine([h.TARGET_ID, h.TARGET_ID, h.TARGET_ID])  # no stop string, no EOS: clipped
    exp = maker.make_experience(next(iter(prompts)))
    assert exp.action_mask.tolist() == [[1, 1, 1]] * 8 and exp.info["response_clipped"].tolist() == [1.0] * 8
