"""NEFTune: noise of scale alpha / sqrt(L*d) on the input embeddings in training, none in eval, nothing when off."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from coati.models import Actor
from coati.models.neftune import enable_neftune
from tests import tiny
from tests.scripts import load_script


def _embeddings_seen(actor, ids, train: bool) -> torch.Tensor:
    """The input embeddings the first decoder layer receives."""
    seen = []
    layer = actor.model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("hidden_states",
                                             args[0] if args else None).detach().clone()), with_kwargs=True)
    actor.train(train)
    with torch.no_grad():
        logits = actor(ids)
    handle.remove()
    return seen[0], logits


def test_noise_scale_in_training_none_in_eval():
    torch.manual_seed(0)
    actor = Actor(AutoModelForCausalLM.from_config(tiny.llama_config(vocab_size=300)))
    ids = torch.randint(0, 300, (4, 50))
    clean, clean_logits = _embeddings_seen(actor, ids, train=False)
    alpha = 5.0
    handle = enable_neftune(actor, alpha)
    noisy, _ = _embeddings_seen(actor, ids, train=True)
    bound = alpha / math.sqrt(50 * 64)
    noise = noisy - clean
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() > 0.99 * bound  # uniform on [-bound, bound]: 12,800 draws reach the edge
    assert abs(noise.std().item() - bound / math.sqrt(3)) < 0.03 * bound
    evaluated, eval_logits = _embeddings_seen(actor, ids, train=False)
    assert torch.equal(evaluated, clean) and torch.equal(eval_logits, clean_logits)
    handle.remove()
    off, off_logits = _embeddings_seen(actor, ids, train=True)
    assert torch.equal(off, clean) and torch.equal(off_logits, clean_logits)


def test_train_sft_flags():
    parser = load_script("examples/train_sft.py").build_parser()
    args = parser.parse_args(["--pretrain", "P", "--dataset", "D"])
    assert args.use_neft is False and args.neftune_noise_alpha == 5.0
    args = parser.parse_args(["--pretrain", "P", "--dataset", "D", "--use_neft", "--neftune_noise_alpha", "10"])
    assert args.use_neft is True and args.neftune_noise_alpha == 10.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--pretrain", "P", "--dataset", "D", "--neftune_noise_alpha", "0"])
