"""Generation behind one interface: a :class:`RolloutEngine` samples responses with explicit settings, returns
their tokens and log-probs, and accepts the trainer's new weights.

The experience maker only talks to this interface, so an engine that generates elsewhere (vLLM, a server) can
replace :class:`~coati.rollout.hf.HFRolloutEngine` (HF ``generate`` on the trained module itself) without
touching experience making or the trainer; :class:`~coati.rollout.vllm.VLLMEngine` (``--rollout_engine vllm``)
samples with vLLM and imports it only when built. An engine's contract:

* ``generate`` samples continuations of left-padded prompts with exactly the ``sampling`` settings given (never a
  checkpoint's ``generation_config.json``) and returns a :class:`Rollout`: tokens after a row's first EOS are
  padding, and ``log_probs`` (when asked for) are those of the sampled tokens under the distribution sampled
  from, ``log_softmax(logits / temperature)`` (temperature 1 for greedy decoding);
* an engine that is not the trainer's module also returns its own log-probs of the sampled tokens
  (``engine_log_probs``) and the ``weight_version`` it sampled with, which the experience maker checks;
* ``update_weights`` makes the next ``generate`` use the given weights, or raises: an engine never silently
  keeps generating from stale weights, and never waits forever on a transfer.
"""
from .base import Rollout, RolloutEngine, cut_at_stop_strings, sampling_temperature
from .hf import HFRolloutEngine
from .vllm import VLLMEngine

__all__ = ["Rollout", "RolloutEngine", "HFRolloutEngine", "VLLMEngine", "cut_at_stop_strings", "sampling_temperature"]
