"""The vLLM rollout engine: an in-process ``vllm.LLM`` samples, the trainer's full weights are copied into it after
every update (``update_weights``), each copy stamped with a weight version (the optimizer step) that every rollout
carries.

Weights travel through ``LLM.collective_rpc("reload_weights")``: the workers' in-place reload, which runs the
model's own ``load_weights`` (HF names in, vLLM's fused layout out) and re-processes the weights as the first load
did; vLLM's weight-transfer engines (NCCL / CUDA IPC) need a GPU. Full weights only: a LoRA actor is merged on
a copy first. Before a copy, the tensors are checked against the checkpoint the engine was started from (names
and shapes): a missing, unknown or misshapen tensor raises naming it, so the engine never keeps sampling from
part-stale weights. Log-probs are vLLM's ``processed_logprobs`` of the sampled tokens: ``log_softmax(logits /
temperature)`` after top-k / top-p (untruncated with the defaults), temperature 1 when greedy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from transformers import GenerationConfig

from ..errors import UsageError
from ..models.lora import is_peft_model
from ..models.loading import base_lm, cast_copy
from .base import Rollout

# GenerationConfig fields the engine maps onto vLLM's SamplingParams (any other one set is refused).
_SUPPORTED = {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "min_new_tokens", "repetition_penalty",
              "eos_token_id", "pad_token_id"}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise UsageError("--rollout_engine vllm needs vLLM: pip install 'coati[vllm]'") from None
    return vllm


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a ``save_pretrained`` dir's safetensors, read from their headers."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    shapes = {}
    for name in files:
        if not (path / name).is_file():
            raise UsageError(f"--rollout_engine vllm loads safetensors checkpoints; {path} has no {name}")
        with safe_open(str(path / name), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def full_weights(weights: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF-named full state dict of an :class:`~coati.models.Actor` (LoRA merged on an fp32 copy), an HF model or
    a state dict."""
    if isinstance(weights, dict):
        return weights
    model = getattr(weights, "model", weights)
    if is_peft_model(model):
        return cast_copy(model, torch.float32).merge_and_unload().state_dict()
    return base_lm(model).state_dict()


class VLLMEngine:
    """A :class:`~coati.rollout.RolloutEngine` on ``vllm.LLM(model_path)``. ``eos_token_id`` ends responses (the
    checkpoint's ``generation_config.json`` never applies), ``pad_token_id`` pads them; ``sleep`` (GPU only) frees
    vLLM's GPU memory between rollouts (level 1); a weight copy to worker processes taking over
    ``sync_timeout_s`` raises (in-process it is a plain call);
    ``llm_kwargs`` go to ``vllm.LLM``."""

    def __init__(self, model_path: str | Path, *, eos_token_id: int | Sequence[int], pad_token_id: int,
                 dtype: str = "auto", gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 sleep: bool = False, seed: int = 0, sync_timeout_s: float = 600.0, **llm_kwargs: Any) -> None:
        vllm = import_vllm()
        if sleep and not torch.cuda.is_available():
            raise UsageError("--vllm_sleep frees vLLM's GPU memory during updates: it needs a GPU (none here)")
        self.expected = checkpoint_shapes(model_path)
        self.eos = [int(t) for t in torch.as_tensor(eos_token_id).reshape(-1).tolist()]
        self.pad_token_id = pad_token_id
        self.sleep = sleep
        self.sync_timeout_s = sync_timeout_s
        self._asleep = False
        self.llm = vllm.LLM(model=str(model_path), dtype=dtype, seed=seed, skip_tokenizer_init=True,
                            generation_config="vllm", logprobs_mode="processed_logprobs",
                            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                            enable_sleep_mode=sleep, **llm_kwargs)
        self._set_version(0)

    # ----- weight version ---------------------------------------------------------------------------------
    def _set_version(self, version: int) -> None:
        self.llm.llm_engine.set_weight_version(str(version))

    @property
    def weight_version(self) -> int:
        """The version of the weights vLLM holds (as vLLM reports it)."""
        return int(self.llm.llm_engine.get_weight_version())

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    # ----- sampling ---------------------------------------------------------------------------------------
    def sampling_params(self, sampling: dict[str, Any]) -> Any:
        """vLLM's SamplingParams for coati's ``sampling``, read through HF's GenerationConfig so unset fields
        have HF's defaults, exactly as the HF engine samples."""
        from vllm import SamplingParams

        config = GenerationConfig(eos_token_id=self.eos, pad_token_id=self.pad_token_id)
        extra = config.update(**sampling)
        unsupported = sorted(set(extra) | (set(config.to_diff_dict()) - _SUPPORTED - {"transformers_version"}))
        if unsupported:
            raise ValueError(f"VLLMEngine cannot apply generation settings {unsupported} (supported: "
                             f"{sorted(_SUPPORTED)})")
        if config.max_new_tokens is None:
            raise ValueError("VLLMEngine needs max_new_tokens")
        sample = bool(config.do_sample)
        return SamplingParams(
            n=1, temperature=float(config.temperature) if sample else 0.0,
            top_p=float(config.top_p) if sample and config.top_p is not None else 1.0,
            top_k=int(config.top_k) if sample and config.top_k else 0,
            repetition_penalty=float(config.repetition_penalty or 1.0), max_tokens=int(config.max_new_tokens),
            min_tokens=int(config.min_new_tokens or 0), ignore_eos=True, stop_token_ids=self.eos,
            logprobs=0, detokenize=False)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: dict[str, Any], *,
                 return_log_probs: bool = True) -> Rollout:
        """Sample; ``log_probs`` stays None (the trainer scores the tokens: ``return_log_probs`` is moot) and
        ``engine_log_probs`` always holds vLLM's (the experience maker compares the two on every batch)."""
        from vllm.inputs import TokensPrompt

        if input_ids.size(0) > 1 and attention_mask[:, -1].eq(0).any():
            raise ValueError("VLLMEngine needs left-padded prompts (a row ends with padding)")
        params = self.sampling_params(sampling)
        self._wake()
        prompts = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in
                   zip(input_ids.cpu(), attention_mask.cpu())]
        # one seed per row from torch's stream, so coati's sampling seed makes rollouts reproducible
        seeds = torch.randint(0, 2 ** 31 - 1, (len(prompts),)).tolist()
        per_row = [params.clone() for _ in prompts]
        for p, s in zip(per_row, seeds):
            p.seed = s
        version = self.weight_version
        outputs = self.llm.generate(prompts, per_row, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
            self._asleep = True
        width = max(1, max(len(o.outputs[0].token_ids) for o in outputs))
        generated = torch.full((len(outputs), width), self.pad_token_id, dtype=input_ids.dtype)
        log_probs = torch.zeros(len(outputs), width, dtype=torch.float32)
        for i, out in enumerate(outputs):
            tokens = list(out.outputs[0].token_ids)
            generated[i, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
            log_probs[i, :len(tokens)] = torch.tensor(
                [float(step[t].logprob) for step, t in zip(out.outputs[0].logprobs, tokens)])
        generated = generated.to(input_ids.device)
        eos = torch.tensor(self.eos, device=generated.device)
        is_eos = torch.isin(generated, eos).long()
        action_mask = (is_eos.cumsum(-1) - is_eos).eq(0).to(attention_mask.dtype)
        lengths = torch.tensor([len(o.outputs[0].token_ids) for o in outputs], device=generated.device)
        action_mask &= (torch.arange(width, device=generated.device) < lengths.unsqueeze(-1)).to(action_mask.dtype)
        sequences = torch.cat([input_ids, generated], dim=1)
        full_mask = torch.cat([attention_mask, action_mask], dim=1)
        engine_lp = log_probs.to(input_ids.device) * action_mask.float()
        return Rollout(sequences, full_mask, action_mask, None, engine_log_probs=engine_lp, weight_version=version)

    # ----- weights ----------------------------------------------------------------------------------------
    def check_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors to send: ``state`` checked against the starting checkpoint's names and shapes (a missing,
        unknown or misshapen tensor raises naming it); a tied copy the checkpoint does not store is dropped."""
        missing = sorted(set(self.expected) - set(state))
        if missing:
            raise ValueError(f"weight sync: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
        ptrs = {state[k].data_ptr() for k in self.expected}
        out = {}
        for name, t in state.items():
            if name not in self.expected:
                if t.data_ptr() in ptrs:  # tied to a stored tensor (lm_head = embeddings)
                    continue
                raise ValueError(f"weight sync: tensor {name!r} is not in the engine's model")
            if tuple(t.shape) != self.expected[name]:
                raise ValueError(f"weight sync: tensor {name!r} has shape {tuple(t.shape)}, the engine's model "
                                 f"{self.expected[name]}")
            out[name] = t.detach()
        return out

    def update_weights(self, weights: nn.Module | dict[str, torch.Tensor], version: int | None = None) -> None:
        """Copy the full weights into vLLM and stamp them with ``version`` (default: the current one + 1)."""
        state = self.check_weights(full_weights(weights))
        self._wake()
        # vLLM's in-place reload: its layerwise machinery restores the loaders that processing after the first
        # load removed (CPU repacks weights), then the model's load_weights fuses HF tensors into its layout
        self.llm.collective_rpc("reload_weights", timeout=self.sync_timeout_s,
                                kwargs={"weights_iterator": list(state.items()), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV of the old weights
        self._set_version(self.weight_version + 1 if version is None else int(version))
