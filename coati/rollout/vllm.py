"""The vLLM rollout engine: an in-process ``vllm.LLM`` samples, the trainer's weights are copied into it after
every update (``update_weights``), each copy stamped with a weight version (the optimizer step) that every rollout
carries.

Processes: under torchrun (DDP, FSDP) every trainer rank holds its own engine and generates its own prompts;
vLLM joins the trainer's process group (``distributed_executor_backend="external_launcher"``) as one
single-process replica per rank, so no collective runs while sampling. Each rank's engine is seeded with
``seed + rank``.

Weights travel through ``LLM.collective_rpc("reload_weights")``: the workers' in-place reload, which runs the
model's own ``load_weights`` (HF names in, vLLM's fused layout out) and re-processes the weights as the first load
did; vLLM's weight-transfer engines (NCCL / CUDA IPC) need a GPU. The tensors are a stream, made one at a time
as vLLM consumes them: a sharded (DTensor, FSDP) parameter is all-gathered by every rank just before it is
loaded, so no rank ever holds a second full copy of the model. A LoRA actor is either merged tensor by tensor
(base + B A scaling, in fp32) or, with ``lora_adapter=True``, sent as an adapter to vLLM's LoRA support (a
fresh adapter id and directory per version; the base weights never move).

A sync is checked before anything moves: names and shapes against the checkpoint the engine was started from
(a missing, unknown or misshapen tensor raises naming it and the rank), and the ranks agree on the outcome over
a gloo group whose timeout is ``sync_timeout_s``, so a rank that fails, or never arrives, makes every rank
raise instead of waiting in an all-gather; the all-gathers of sharded weights during a sync time out after
``sync_timeout_s`` too, so a rank that stalls in the stream fails the others within it.

Log-probs are vLLM's ``processed_logprobs`` of the sampled tokens: ``log_softmax(logits / temperature)`` after
top-k / top-p (untruncated with the defaults), temperature 1 when greedy.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from transformers import GenerationConfig

from ..errors import UsageError
from ..models.lora import is_peft_model
from ..models.loading import base_lm
from ..models.quant import bnb_layers, dequantized_weight, quant_mode
from ..rl.config import RLConfig
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


class WeightEntry(NamedTuple):
    """One tensor of a sync: its HF name, its full shape, how to make it (an all-gather under FSDP, a merge for
    LoRA), and the name of the tensor it is tied to (the same storage), if any."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]
    tied_to: str | None = None


def _entries(state: dict[str, torch.Tensor], make: Callable[[str, torch.Tensor], Callable[[], torch.Tensor]],
             rename: Callable[[str], str] = lambda k: k,
             shapes: dict[str, tuple[int, ...]] | None = None) -> list[WeightEntry]:
    """One entry per state-dict key; ``shapes`` gives the full shape of keys whose tensor is packed."""
    first: dict[Any, str] = {}
    out = []
    for key, t in state.items():
        same = id(t) if isinstance(t, DTensor) else (t.data_ptr(), t.dtype, tuple(t.shape))
        name = rename(key)
        out.append(WeightEntry(name, (shapes or {}).get(key, tuple(t.shape)), make(key, t), first.get(same)))
        first.setdefault(same, name)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (FSDP / tensor-parallel shard) is all-gathered, every rank taking part."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def _merged(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A peft LoRA layer's merged weight, ``W + B A scaling`` per active adapter (``weight`` is the full ``W``),
    computed in fp32 from the gathered tensors and returned in ``W``'s dtype."""
    merged = weight.float()
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        delta = _full(layer.lora_B[name].weight).float() @ _full(layer.lora_A[name].weight).float()
        merged = merged + (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[name]
    return merged.to(weight.dtype)


def weight_entries(weights: nn.Module | dict[str, torch.Tensor], *, lora_adapter: bool = False) -> list[WeightEntry]:
    """The tensors a sync sends, named as the HF checkpoint names them, each made only when called: the full
    weights of an :class:`~coati.models.Actor`, an HF model or a state dict (a LoRA actor merged tensor by
    tensor, a bitsandbytes base dequantized), or, with ``lora_adapter``, the LoRA actor's adapter tensors as peft
    saves them."""
    plain = lambda key, t: lambda: _full(t)  # noqa: E731
    if isinstance(weights, dict):
        return _entries(weights, plain)
    model = getattr(weights, "model", weights)
    if lora_adapter:
        if not is_peft_model(model):
            raise ValueError("weight sync: the engine serves a LoRA adapter but the actor has none")
        config = model.peft_config[model.active_adapter]
        if config.bias != "none" or config.modules_to_save:
            raise ValueError("weight sync: the actor trains biases or whole modules beside its LoRA adapter, "
                             "which a vLLM adapter cannot carry (sync it merged)")
        state = {k: v for k, v in model.state_dict(keep_vars=True).items() if ".lora_" in k}
        return _entries(state, plain, _adapter_name)
    lm = base_lm(model)
    # a bitsandbytes base (--quant): each packed weight goes out dequantized, its quantization state stays home
    packed = dict(bnb_layers(lm)) if quant_mode(lm) else {}
    state = {k: v for k, v in lm.state_dict(keep_vars=True).items() if ".lora_" not in k
             and not any(k.startswith(f"{n}.") and k not in (f"{n}.weight", f"{n}.bias") for n in packed)}
    lora = {}
    if is_peft_model(model):
        from peft.tuners.lora import LoraLayer

        lora = {name: m for name, m in lm.named_modules() if isinstance(m, LoraLayer)}
        dora = {n for m in lora.values() for n in m.active_adapters if m.use_dora.get(n)}
        if dora:
            raise ValueError(f"weight sync: {sorted(dora)[0]!r} is a DoRA adapter; the vLLM engine merges plain LoRA "
                             f"only")

    def make(key: str, t: torch.Tensor) -> Callable[[], torch.Tensor]:
        layer = packed.get(key.removesuffix(".weight"))
        weight = (lambda: dequantized_weight(layer)) if layer is not None else (lambda: _full(t))
        owner, _, leaf = key.rpartition(".base_layer.")
        if owner in lora and leaf == "weight":
            return lambda: _merged(lora[owner], weight())
        return weight

    shapes = {f"{n}.weight": (m.out_features, m.in_features) for n, m in packed.items()}
    return _entries(state, make, lambda k: k.replace(".base_layer.", "."), shapes)


def _adapter_name(key: str) -> str:
    """peft's saved name of an adapter tensor (the adapter's own name dropped: ``lora_A.default.weight`` ->
    ``lora_A.weight``)."""
    head, _, tail = key.partition(".lora_")
    kind, _, rest = tail.partition(".")
    return f"{head}.lora_{kind}.{rest.partition('.')[2]}"


def full_weights(weights: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF-named full state dict of an :class:`~coati.models.Actor` (LoRA merged in fp32), an HF model or
    a state dict; made tensor by tensor (see :func:`weight_entries`)."""
    return {e.name: e.make() for e in weight_entries(weights)}


def _gather_groups(weights: nn.Module | dict[str, torch.Tensor]) -> list[Any]:
    """The process groups that all-gather the sharded (DTensor) weights among ``weights``; none when unsharded."""
    tensors = weights.values() if isinstance(weights, dict) else weights.parameters()
    meshes = {id(t.device_mesh): t.device_mesh for t in tensors if isinstance(t, DTensor)}
    return list({id(g): g for mesh in meshes.values() for g in mesh.get_all_groups()}.values())


@contextmanager
def _bounded(groups: list[Any], seconds: float) -> Iterator[None]:
    """Within the block, ``groups`` time out after ``seconds``, not the training timeout (30 minutes by default),
    so a rank stalled in a sync's stream fails the others within the sync timeout (gloo raises; NCCL's watchdog
    aborts the process); the training timeout returns afterwards."""
    saved = []
    try:
        for b in (g._get_backend(device) for g in groups for device in g._device_types):
            # a debug wrapper (TORCH_DISTRIBUTED_DEBUG=DETAIL) keeps the training timeout
            if hasattr(b, "_set_default_timeout") and hasattr(getattr(b, "options", None), "_timeout"):
                saved.append((b, b.options._timeout))
                b._set_default_timeout(timedelta(seconds=seconds))
        yield
    finally:
        for b, timeout in saved:
            b._set_default_timeout(timeout)


def _world() -> tuple[int, int]:
    """(rank, world size) of the trainer's process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# vLLM's LoRA slots come in these ranks (vllm.config.lora.MaxLoRARanks)
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _repack_tied_head(worker: Any) -> None:
    """Re-process a tied output head after a reload. It shares the embedding's weight but loads no tensor of its
    own, so the reload never re-processes it, and on CPU its matmul keeps the old embedding repacked (the engine's
    log-probs drift from the trainer's after the first sync)."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is not None and any(m is not head and getattr(m, "weight", None) is weight for m in model.modules()):
        head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    """A :class:`~coati.rollout.RolloutEngine` on ``vllm.LLM(model_path)``, one per trainer process.
    ``eos_token_id`` ends responses (the checkpoint's ``generation_config.json`` never applies), ``pad_token_id``
    pads them; ``sleep`` (GPU only) frees vLLM's GPU memory between rollouts (level 1); ``lora_rank`` > 0 serves
    the actor's LoRA adapter through vLLM's LoRA support instead of merged weights; a sync that does not finish
    on every rank within ``sync_timeout_s`` raises; ``llm_kwargs`` go to ``vllm.LLM``. On CPU the processes of
    one host share its memory, so each takes ``gpu_memory_utilization`` / local processes."""

    def __init__(self, model_path: str | Path, *, eos_token_id: int | Sequence[int], pad_token_id: int,
                 dtype: str = "auto", gpu_memory_utilization: float = RLConfig.vllm_gpu_memory_utilization,
                 tensor_parallel_size: int = RLConfig.vllm_tensor_parallel_size, sleep: bool = RLConfig.vllm_sleep,
                 seed: int = 0, sync_timeout_s: float = RLConfig.vllm_sync_timeout_s, lora_rank: int = 0,
                 **llm_kwargs: Any) -> None:
        vllm = import_vllm()
        # syncs stream the trainer's tensors (a generator) and a function into the workers: only an engine in this
        # process takes them (vLLM's multiprocess client serialises its calls and refuses both)
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise UsageError("--rollout_engine vllm runs vLLM in the trainer's process: unset "
                             "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if sleep and not torch.cuda.is_available():
            raise UsageError("--vllm_sleep frees vLLM's GPU memory during updates: it needs a GPU (none here)")
        self.rank, self.world_size = _world()
        if self.world_size > 1:
            if tensor_parallel_size > 1:
                raise UsageError("--vllm_tensor_parallel_size > 1 under torchrun is not supported: each trainer "
                                 "process runs its own single-device engine")
            # a replica per rank in the trainer's process group; a gloo group with the sync timeout checks syncs
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=sync_timeout_s))
            if not torch.cuda.is_available():
                gpu_memory_utilization /= int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        else:
            self._group = None
        self.expected = checkpoint_shapes(model_path)
        self.eos = [int(t) for t in torch.as_tensor(eos_token_id).reshape(-1).tolist()]
        self.pad_token_id = pad_token_id
        self.sleep = sleep
        self.sync_timeout_s = sync_timeout_s
        self._asleep = False
        self.lora_adapter = lora_rank > 0
        self._lora: Any = None  # the LoRARequest rollouts sample with (adapter mode, after the first sync)
        self._lora_dir = Path(tempfile.mkdtemp(prefix=f"coati-vllm-lora-rank{self.rank}-")) \
            if self.lora_adapter else None
        if self.lora_adapter:
            weakref.finalize(self, shutil.rmtree, self._lora_dir, True)
            if lora_rank > _VLLM_LORA_RANKS[-1]:
                raise UsageError(f"vLLM serves LoRA ranks up to {_VLLM_LORA_RANKS[-1]}; --lora_rank is {lora_rank}")
            llm_kwargs.update(enable_lora=True, max_loras=1,
                              max_lora_rank=min(r for r in _VLLM_LORA_RANKS if r >= lora_rank))
        self.llm = vllm.LLM(model=str(model_path), dtype=dtype, seed=seed + self.rank, skip_tokenizer_init=True,
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
            n=1, temperature=(1.0 if config.temperature is None else float(config.temperature)) if sample else 0.0,
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
        outputs = self.llm.generate(prompts, per_row, use_tqdm=False, lora_request=self._lora)
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
    def _problem(self, entries: list[WeightEntry]) -> str | None:
        """What is wrong with a sync's tensors, checked against the starting checkpoint's names and shapes (a
        LoRA adapter's against the layers it adapts), or None."""
        if self.lora_adapter:
            for name, shape, _, _ in entries:
                base = name.removeprefix("base_model.model.").replace(".lora_A.", ".").replace(".lora_B.", ".")
                full = self.expected.get(base, ())
                want = None if len(full) != 2 else (shape[0], full[1]) if ".lora_A." in name else (full[0], shape[1])
                if tuple(shape) != want:
                    return f"tensor {name!r} (shape {tuple(shape)}) adapts no layer of the engine's model"
            return None if entries else "the actor has no LoRA tensors"
        names = {e.name for e in entries}
        missing = sorted(set(self.expected) - names)
        if missing:
            return f"tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
        for name, shape, _, tied_to in entries:
            if name not in self.expected:
                if tied_to in self.expected:  # a tied copy the checkpoint does not store (lm_head = embeddings)
                    continue
                return f"tensor {name!r} is not in the engine's model"
            if tuple(shape) != self.expected[name]:
                return f"tensor {name!r} has shape {tuple(shape)}, the engine's model {self.expected[name]}"
        return None

    def _agree(self, problem: str | None) -> None:
        """Raise on every rank when any rank has a problem (each one named with its rank); the exchange is bounded
        by ``sync_timeout_s``, so a rank that never arrives is an error, not a hang."""
        problems = [problem]
        if self._group is not None:
            problems = [None] * self.world_size
            try:
                dist.all_gather_object(problems, problem, group=self._group)
            except Exception as e:  # gloo raises on its timeout or a lost peer
                raise RuntimeError(f"weight sync on rank {self.rank}: the other ranks did not reach the sync within "
                                   f"{self.sync_timeout_s:g} s ({type(e).__name__})") from e
        failed = [f"weight sync on rank {r}: {p}" for r, p in enumerate(problems) if p]
        if failed:
            raise ValueError("; ".join(failed))

    def update_weights(self, weights: nn.Module | dict[str, torch.Tensor], version: int | None = None) -> None:
        """Send the actor's weights (its adapter in LoRA-adapter mode) to vLLM, tensor by tensor, and stamp them
        with ``version`` (default: the current one + 1). Every rank calls it together."""
        try:
            entries = weight_entries(weights, lora_adapter=self.lora_adapter)
            problem = self._problem(entries)
        except ValueError as e:
            entries, problem = [], str(e).removeprefix("weight sync: ")
        if not self.lora_adapter:  # tied copies stay home
            entries = [e for e in entries if e.name in self.expected]
        self._agree(problem)
        self._wake()
        sent: list[str] = []
        gather_failed: list[str] = []
        streamed = [False]
        groups = _gather_groups(weights)

        def stream():
            for entry in entries:
                sent.append(entry.name)
                try:
                    tensor = entry.make()
                except Exception as e:  # a peer stalled or died in an all-gather: the load fails with it
                    if groups:
                        gather_failed.append(f"all-gathering tensor {entry.name!r} failed: {type(e).__name__}: "
                                             f"{(str(e).strip().splitlines() or [''])[-1]}")
                    raise
                yield entry.name, tensor
            streamed[0] = True

        tensors = stream()
        problem = None
        with _bounded(groups, self.sync_timeout_s):
            try:
                if self.lora_adapter:
                    self._load_adapter(weights, tensors)
                else:
                    # vLLM's in-place reload: its layerwise machinery restores the loaders that processing after
                    # the first load removed (CPU repacks weights), then the model's load_weights fuses HF tensors
                    self.llm.collective_rpc("reload_weights", timeout=self.sync_timeout_s,
                                            kwargs={"weights_iterator": tensors, "is_checkpoint_format": True})
                    self.llm.collective_rpc(_repack_tied_head, timeout=self.sync_timeout_s)
            except Exception as e:  # noqa: BLE001 - reported on every rank by _agree
                where = "finishing the load" if streamed[0] else f"loading tensor {sent[-1] if sent else None!r}"
                problem = f"{where} failed: {type(e).__name__}: {e}"
            # a rank that stopped early still joins the remaining all-gathers (none after a failed one)
            left = [] if gather_failed else [name for name, _ in tensors]
        if gather_failed:  # the gathering group is broken: no agreement can follow, each rank reports its own
            raise RuntimeError(f"weight sync on rank {self.rank}: {gather_failed[0]} (sync timeout "
                               f"{self.sync_timeout_s:g} s)")
        if problem is None and left:
            problem = f"tensor {left[0]!r} was not loaded ({len(left)} left in all)"
        self._agree(problem)
        self.llm.reset_prefix_cache()  # cached KV of the old weights
        self._set_version(self.weight_version + 1 if version is None else int(version))

    def _load_adapter(self, weights: nn.Module, tensors: Any) -> None:
        """Write the adapter to a fresh directory and load it into vLLM under a fresh id (vLLM caches an adapter
        by id, so a reused id would keep serving the old tensors), then drop the previous one."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        model = getattr(weights, "model", weights)
        adapter_id = (self._lora.lora_int_id + 1) if self._lora is not None else 1
        path = self._lora_dir / f"adapter_{adapter_id}"
        path.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors}, str(path / "adapter_model.safetensors"))
        config = model.peft_config[model.active_adapter]
        config.save_pretrained(str(path))
        request = LoRARequest(f"coati-{adapter_id}", adapter_id, str(path))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the adapter at {path}")
        if self._lora is not None:
            self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            shutil.rmtree(self._lora.lora_path, ignore_errors=True)
        self._lora = request
