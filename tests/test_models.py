"""Actor / Critic / RewardModel wrappers, LoRA, save/load round trips, families and generation."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from coati.compat import GPTActor, GPTCritic, GPTNeoXActor, LlamaActor, LlamaCritic, LlamaRM, PolyglotKoRM
from coati.models import (
    FAMILIES, Actor, Critic, LoraSettings, RewardModel, action_mask_from_tokens, generate_with_masks, get_family,
    lora_targets,
)
from tests import tiny

SMALL = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama": lambda: tiny.llama_config(**SMALL),
    "gpt_neox": lambda: tiny.gpt_neox_config(**SMALL),
    "gpt2": lambda: tiny.gpt2_config(**SMALL),
}


def _pad(rows, side, pad_id=0):
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad_id] * (width - len(r))
        ids.append(fill + r if side == "left" else r + fill)
        mask.append([0] * len(fill) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _checkpointing(model):
    if hasattr(model, "is_activation_checkpointing"):  # transformers 5 name
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def _perturb(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


IDS = torch.tensor([[5, 17, 9, 33, 40, 8, 21], [12, 3, 44, 7, 19, 60, 2]])


# --- forward semantics ------------------------------------------------------------------------------

def test_actor_log_probs_equal_hand_log_softmax(tiny_llama_dir):
    actor = Actor.from_pretrained(tiny_llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lp = actor(IDS, torch.ones_like(IDS), num_actions=3)
    logits = _logits(hf, IDS)
    assert lp.shape == (2, 3)
    for b in range(2):
        for j, t in enumerate(range(IDS.size(1) - 3, IDS.size(1))):
            expected = torch.log_softmax(logits[b, t - 1].double(), -1)[IDS[b, t]].item()
            assert lp[b, j].item() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(actor(IDS), logits, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])  # gpt2: absolute positions
def test_left_and_right_padding_give_equal_outputs(family):
    torch.manual_seed(0)
    cfg = CONFIGS[family]()
    actor, critic, rm = Actor.from_config(cfg), Critic.from_config(cfg), RewardModel.from_config(cfg)
    rows = [[5, 17, 9, 33, 40, 8], [12, 3, 44, 7]]
    left_ids, left_mask = _pad(rows, "left")
    right_ids, right_mask = _pad(rows, "right")
    alone = torch.tensor([rows[1]])
    with torch.no_grad():
        # reward: left == right == the short row scored alone
        r_left, r_right = rm(left_ids, left_mask), rm(right_ids, right_mask)
        assert torch.allclose(r_left, r_right, atol=1e-5)
        assert r_left[1].item() == pytest.approx(rm(alone, torch.ones_like(alone))[0].item(), abs=1e-5)
        # both-sides padding: the reward is still read at the last real token
        both_ids = torch.tensor([[0, 12, 3, 44, 7, 0]])
        assert rm(both_ids, torch.tensor([[0, 1, 1, 1, 1, 0]]))[0].item() == pytest.approx(r_left[1].item(), abs=1e-5)
        # actor logits / critic values at the real tokens agree across paddings
        assert torch.allclose(actor(left_ids, left_mask)[1, 2:], actor(right_ids, right_mask)[1, :4], atol=1e-4)
        v_left, v_right = critic(left_ids, left_mask), critic(right_ids, right_mask)
        assert torch.allclose(v_left[1, 2:], v_right[1, :4], atol=1e-5)
        # action log-probs / values of a left-padded row equal the unpadded row's
        lp = actor(left_ids, left_mask, num_actions=2)
        assert torch.allclose(lp[1], actor(alone, torch.ones_like(alone), num_actions=2)[0], atol=1e-5)
        # critic action values are the values of the states before each action token
        assert torch.allclose(critic(left_ids, left_mask, num_actions=2), v_left[:, -3:-1])
    assert v_left.dtype == torch.float32 and critic.value_head.weight.dtype == torch.float32


@pytest.mark.parametrize("alias", ["OPTCritic", "BLOOMRM"])
def test_opt_and_bloom_value_models(alias):
    from transformers import BloomConfig, OPTConfig

    import coati.compat as models

    cfg = {  # OPT with a projected embedding: the value head must read the projected width
        "OPTCritic": OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                               word_embed_proj_dim=16, max_position_embeddings=64, dropout=0.0, pad_token_id=0),
        "BLOOMRM": BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=2, pad_token_id=0),
    }[alias]
    torch.manual_seed(0)
    model = getattr(models, alias)(config=cfg, lora_rank=2)
    assert model.value_head.in_features == (16 if alias == "OPTCritic" else 32)
    _randomize_lora(model)
    rm = RewardModel(model.model, model.value_head)
    rows = [[5, 17, 9, 33, 40, 8], [12, 3, 44, 7]]
    with torch.no_grad():
        assert torch.allclose(rm(*_pad(rows, "left")), rm(*_pad(rows, "right")), atol=1e-5)


def test_gradient_checkpointing_matches_plain_forward():
    cfg = CONFIGS["llama"]()
    plain = Actor.from_config(cfg)
    ckpt = Actor.from_config(cfg, grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    assert _checkpointing(ckpt.model) and not _checkpointing(plain.model)
    grads = []
    for actor in (plain, ckpt):
        actor.train()
        actor(IDS, torch.ones_like(IDS), num_actions=4).mean().backward()
        grads.append(actor.model.model.layers[0].mlp.up_proj.weight.grad)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


# --- save / load ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_full_save_reload_and_load_weights(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    actor = Actor.from_pretrained(src)
    _perturb(actor)  # stand-in for training
    expected = _logits(actor.model, IDS)
    tok = AutoTokenizer.from_pretrained(src)
    actor.save_pretrained(tmp_path / "out", tokenizer=tok)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(_logits(reloaded, IDS), expected, atol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").vocab_size == tok.vocab_size
    # resume: weights written by save_pretrained go back into the live model in place
    _perturb(actor, seed=2)
    assert not torch.allclose(_logits(actor.model, IDS), expected, atol=1e-3)
    actor.load_weights(tmp_path / "out")
    assert torch.allclose(_logits(actor.model, IDS), expected, atol=1e-6)
    # sharded checkpoints (index file) load too
    actor.model.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _perturb(actor, seed=3)
    actor.load_weights(tmp_path / "sharded")
    assert torch.allclose(_logits(actor.model, IDS), expected, atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_lora_merged_and_adapter_saves(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    actor = Actor.from_pretrained(src, lora=LoraSettings(rank=4))
    _randomize_lora(actor)
    expected = _logits(actor.model, IDS)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(src), IDS), atol=1e-3)

    actor.save_pretrained(tmp_path / "merged", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(_logits(merged, IDS), expected, atol=1e-5)
    # the live model kept its adapters
    assert actor.lora_enabled and torch.allclose(_logits(actor.model, IDS), expected)

    actor.save_pretrained(tmp_path / "adapter", tokenizer=AutoTokenizer.from_pretrained(src))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "tokenizer_config.json").is_file()
    fresh = Actor.from_pretrained(src, lora=LoraSettings(rank=4))
    fresh.load_weights(tmp_path / "adapter")
    assert torch.allclose(_logits(fresh.model, IDS), expected, atol=1e-6)
    # an adapter dir loads as its base with the adapter merged in
    from_adapter = Actor.from_pretrained(tmp_path / "adapter")
    assert not from_adapter.lora_enabled
    assert torch.allclose(_logits(from_adapter.model, IDS), expected, atol=1e-5)
    with pytest.raises(ValueError):
        fresh.load_weights(tmp_path / "merged")


def test_value_models_round_trip(tiny_llama_dir, tmp_path):
    critic = Critic.from_pretrained(tiny_llama_dir)
    _perturb(critic)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = critic(IDS, mask)
    critic.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / "value_head.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "critic")  # a plain HF dir
    with torch.no_grad():
        assert torch.allclose(Critic.from_pretrained(tmp_path / "critic")(IDS, mask), expected, atol=1e-5)
        # the same files make a reward model: reward = value at the last token
        assert torch.allclose(RewardModel.from_pretrained(tmp_path / "critic")(IDS, mask), expected[:, -1], atol=1e-5)
    _perturb(critic, seed=5)
    critic.load_weights(tmp_path / "critic")
    with torch.no_grad():
        assert torch.allclose(critic(IDS, mask), expected, atol=1e-6)


def test_lora_reward_model_round_trip(tiny_llama_dir, tmp_path):
    rm = RewardModel.from_pretrained(tiny_llama_dir, lora=LoraSettings(rank=4))
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    assert {"value_head.weight", "value_head.bias"} <= set(trainable)
    _randomize_lora(rm)
    _perturb(rm.value_head)
    with torch.no_grad():
        expected = rm(IDS, torch.ones_like(IDS))
    rm.save_pretrained(tmp_path / "rm")
    fresh = RewardModel.from_pretrained(tiny_llama_dir, lora=LoraSettings(rank=4))
    fresh.load_weights(tmp_path / "rm")
    with torch.no_grad():
        assert torch.allclose(fresh(IDS, torch.ones_like(IDS)), expected, atol=1e-6)
        merged = RewardModel.from_pretrained(tmp_path / "rm")
        assert torch.allclose(merged(IDS, torch.ones_like(IDS)), expected, atol=1e-5)


# --- LoRA -------------------------------------------------------------------------------------------

def test_lora_trainable_parameters_and_bias_modes():
    actor = Actor.from_config(CONFIGS["llama"](), family="llama", lora=LoraSettings(rank=4))
    trainable = [n for n, p in actor.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2  # A and B for 7 projections x 2 layers
    assert all("lora_" in n for n in trainable)
    assert actor.model.peft_config["default"].lora_alpha == 4  # alpha defaults to rank
    # GPT-2 (Conv1D) with train_bias="all": biases train as well, base weights stay frozen
    gpt = Actor.from_config(CONFIGS["gpt2"](), family="gpt2", lora=LoraSettings(rank=2, train_bias="all"))
    names = {n for n, p in gpt.named_parameters() if p.requires_grad}
    assert any(n.endswith("c_attn.base_layer.bias") for n in names)
    assert not any(n.endswith("c_attn.base_layer.weight") for n in names)
    with pytest.raises(ValueError):
        LoraSettings(rank=2, train_bias="some")


def test_disable_adapter_is_the_base_policy_after_training():
    torch.manual_seed(0)
    cfg = CONFIGS["llama"]()
    actor = Actor.from_config(cfg, lora=LoraSettings(rank=4))
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        base_lp = actor(IDS, mask, num_actions=4)  # adapters start as identity
    opt = torch.optim.Adam([p for p in actor.parameters() if p.requires_grad], lr=1e-2)
    (-actor(IDS, mask, num_actions=4).mean()).backward()
    opt.step()
    with torch.no_grad():
        trained_lp = actor(IDS, mask, num_actions=4)
        with actor.disable_adapter():
            ref_lp = actor(IDS, mask, num_actions=4)
        after = actor(IDS, mask, num_actions=4)
    assert (trained_lp - base_lp).abs().max() > 1e-3
    assert torch.allclose(ref_lp, base_lp, atol=1e-6)
    assert torch.equal(after, trained_lp)
    plain = Actor.from_config(cfg)
    with torch.no_grad(), plain.disable_adapter():  # no-op without LoRA
        assert torch.equal(plain(IDS, mask), plain(IDS, mask))


# --- families / Coati aliases ------------------------------------------------------------------------

def test_coati_aliases_build_the_right_models(tiny_llama_dir):
    a = LlamaActor(config=CONFIGS["llama"]())
    assert type(a) is Actor and a.config.model_type == "llama"
    assert type(LlamaCritic(config=CONFIGS["llama"]())) is Critic
    assert type(LlamaRM(config=CONFIGS["llama"]())) is RewardModel
    assert GPTNeoXActor(config=CONFIGS["gpt_neox"]()).config.model_type == "gpt_neox"
    pko = PolyglotKoRM(config=CONFIGS["gpt_neox"](), lora_rank=2)
    assert type(pko) is RewardModel
    assert set(pko.model.peft_config["default"].target_modules) == {
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    gpt_critic = GPTCritic(config=CONFIGS["gpt2"](), lora_rank=2, lora_train_bias="lora_only")
    assert type(gpt_critic) is Critic and gpt_critic.model.peft_config["default"].bias == "lora_only"
    assert type(GPTActor(config=CONFIGS["gpt2"]())) is Actor
    from_path = LlamaActor(pretrained=tiny_llama_dir, checkpoint=True, lora_rank=2)
    assert from_path.lora_enabled and _checkpointing(from_path.base_lm)
    with pytest.raises(ValueError):
        LlamaActor(config=CONFIGS["gpt2"]())  # wrong architecture for the family
    with pytest.raises(ValueError):
        LlamaActor()
    assert get_family("polyglot-ko").model_types == ("gpt_neox",)
    assert lora_targets("auto") == "all-linear" and "q_proj" in lora_targets("llama")
    assert {"llama", "gpt_neox", "polyglot_ko", "gpt2", "opt", "bloom", "auto"} <= set(FAMILIES)


# --- generation -------------------------------------------------------------------------------------

class _ForceEos(LogitsProcessor):
    """Row i emits EOS at generated step eos_at[i] (None: never)."""

    def __init__(self, prompt_len, eos_at, eos_id):
        self.prompt_len, self.eos_at, self.eos_id = prompt_len, eos_at, eos_id

    def __call__(self, input_ids, scores):
        step = input_ids.size(1) - self.prompt_len
        scores = scores.clone()
        for row, at in enumerate(self.eos_at):
            if at is not None and step == at:
                scores[row] = float("-inf")
                scores[row, self.eos_id] = 0.0
            else:
                scores[row, self.eos_id] = float("-inf")
        return scores


@pytest.mark.parametrize("pad_id", [0, 2])  # pad != eos (llama) and pad == eos (gpt2 style)
def test_generate_with_masks_action_mask_stops_at_first_eos(pad_id):
    torch.manual_seed(0)
    actor = Actor.from_config(CONFIGS["llama"]())
    ids, mask = _pad([[5, 17, 9, 33], [12, 3], [7, 8, 9]], "left", pad_id)
    procs = LogitsProcessorList([_ForceEos(ids.size(1), [1, None, 0], eos_id=2)])
    seqs, full_mask, action_mask = generate_with_masks(
        actor, ids, mask, eos_token_id=2, pad_token_id=pad_id, do_sample=True, temperature=0.7, top_k=20,
        max_new_tokens=5, logits_processor=procs)
    assert action_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    gen = seqs[:, ids.size(1):]
    assert gen[0, 1].item() == 2 and gen[2, 0].item() == 2 and (gen[1] != 2).all()
    assert gen[0, 2:].tolist() == [pad_id] * 3
    assert torch.equal(seqs[:, :ids.size(1)], ids)
    assert torch.equal(full_mask, torch.cat([mask, action_mask], 1))
    assert action_mask_from_tokens(torch.tensor([[4, 2, 2, 0], [2, 5, 2, 0], [3, 4, 5, 6]]), [2]).long().tolist() == [
        [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_generate_left_padded_matches_unpadded_greedy():
    torch.manual_seed(0)
    actor = Actor.from_config(CONFIGS["gpt2"](), grad_checkpoint=True)  # absolute positions: padding-sensitive
    actor.train()
    rows = [[5, 17, 9, 33, 40], [12, 3]]
    ids, mask = _pad(rows, "left")
    kw = dict(eos_token_id=2, pad_token_id=0, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    seqs, _, action_mask = generate_with_masks(actor, ids, mask, **kw)
    alone = torch.tensor([rows[1]])
    seqs_alone, _, _ = generate_with_masks(actor, alone, torch.ones_like(alone), **kw)
    assert torch.equal(seqs[1, ids.size(1):], seqs_alone[0, 2:])
    assert action_mask.all() and actor.training  # generate restores train mode
    # the log-probs of the generated tokens match between padded and unpadded sequences
    with torch.no_grad():
        full_mask = torch.cat([mask, action_mask.long()], 1)
        lp = actor(seqs, full_mask, num_actions=4)
        lp_alone = actor(seqs_alone, torch.ones_like(seqs_alone), num_actions=4)
    assert torch.allclose(lp[1], lp_alone[0], atol=1e-5)


class _EosBias(LogitsProcessor):
    """Raises EOS, so that rows end at different steps of a sampled batch."""

    def __init__(self, eos_id, bias):
        self.eos_id, self.bias = eos_id, bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eos_id] += self.bias
        return scores


@pytest.mark.parametrize("family, pad_id", [("llama", 0), ("llama", 2), ("gpt2", 0), ("gpt_neox", 0)])
def test_generate_with_masks_samples_what_plain_generate_samples(family, pad_id):
    """The decoding loop that drops finished rows (what generate_with_masks samples with) gives, for a fixed
    seed, the tokens of transformers' own loop: left-padded prompts, rows ending at EOS mid-batch, sampling
    with temperature, top-k and top-p, and greedy."""
    from transformers import GenerationConfig

    from coati.models.generation import DROPS_FINISHED_ROWS

    torch.manual_seed(0)
    actor = Actor.from_config(CONFIGS[family]()).eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = _pad([torch.randint(3, 128, (int(n),), generator=g).tolist() for n in [7, 2, 5, 3, 6, 4, 1, 7]],
                     "left", pad_id)
    procs = LogitsProcessorList([_EosBias(2, 0.5)])
    for sampling in (dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9), dict(do_sample=False)):
        config = GenerationConfig(eos_token_id=2, pad_token_id=pad_id, max_new_tokens=16, **sampling)
        torch.manual_seed(5)
        want = actor.generate(ids, mask, generation_config=config, logits_processor=procs)
        rows = []  # the batch size of every forward
        hook = actor.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].size(0)),
                                                     with_kwargs=True)
        torch.manual_seed(5)
        got, _, action_mask = generate_with_masks(actor, ids, mask, eos_token_id=2, pad_token_id=pad_id,
                                                  max_new_tokens=16, logits_processor=procs, **sampling)
        hook.remove()
        lengths = action_mask.sum(1)
        if sampling["do_sample"]:  # the case in point: rows end at different steps while others go on
            assert lengths.max() == 16 and len(set(lengths.tolist())) > 2
            if DROPS_FINISHED_ROWS:  # and the model ran on the unfinished rows only
                assert rows[-1] == (lengths == 16).sum() < len(ids) == rows[0]
        assert torch.equal(got, want)


def _dropout_configs():
    from transformers import BloomConfig, OPTConfig

    p = 0.3
    opt = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=64, dropout=p, attention_dropout=p,
                    activation_dropout=p, layerdrop=p, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    bloom = BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=p, attention_dropout=p,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": tiny.llama_config(**SMALL, attention_dropout=p),
        "gpt2": tiny.gpt2_config(**SMALL, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p),
        "gpt_neox": tiny.gpt_neox_config(**SMALL, hidden_dropout=p, attention_dropout=p),
        "opt": opt,
        "bloom": bloom,
    }


@pytest.mark.parametrize("family, attn", [(f, a) for f in ("llama", "gpt2", "gpt_neox", "opt") for a in ("sdpa", "eager")]
                         + [("bloom", "eager")])  # BLOOM has no sdpa path
def test_disable_dropout_makes_train_mode_equal_eval_mode(family, attn):
    """Every way HF layers and peft drop out (modules, float attributes handed to sdpa / functional dropout,
    OPT's layerdrop, LoRA dropout) is off: train-mode outputs equal eval-mode outputs exactly."""
    from coati.models import disable_dropout

    config = _dropout_configs()[family]
    config._attn_implementation = attn
    torch.manual_seed(0)
    actor = Actor.from_config(config, lora=LoraSettings(rank=4, dropout=0.3))
    _randomize_lora(actor.model)
    ids, mask = _pad([[5, 17, 9, 33, 40, 8, 21, 4], [12, 3, 44, 7]], "left")
    with torch.no_grad():
        actor.train()
        noisy = actor(ids, mask, num_actions=3)
        actor.eval()
        clean = actor(ids, mask, num_actions=3)
        assert not torch.equal(noisy, clean)  # dropout is on in train mode before
        disable_dropout(actor)
        actor.train()
        trained_mode = actor(ids, mask, num_actions=3)
    assert torch.equal(trained_mode, clean)
    assert actor.config.to_dict() == config.to_dict()  # the saved config keeps its dropout settings
