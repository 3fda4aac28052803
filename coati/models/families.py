"""Model families as data: which HF ``model_type`` a family covers and where LoRA goes.

One :class:`~coati.models.base.Actor` / ``Critic`` / ``RewardModel`` works for every causal LM; a family only
picks LoRA target modules (Coati's ``LlamaActor(pretrained=...)`` constructors are in :mod:`coati.compat`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Family:
    """A named group of HF architectures.

    ``model_types`` are the ``config.model_type`` values it covers (empty = any). ``lora_target_modules`` is
    a tuple of module-name suffixes, or ``"all-linear"`` (peft picks every linear layer except the LM head).
    ``packing_model_types`` are the architectures whose attention keeps packed samples apart (see
    :mod:`coati.dataset.packing`): they hand ``position_ids`` to transformers' causal-mask builder, which turns
    position ids restarting at 0 into a block-diagonal mask. OPT derives positions from the attention mask and
    builds its mask without position ids, BLOOM takes no position ids at all (ALiBi): both would let a packed
    sample attend to the one before it. ``tp_plan``: transformers ships a tensor-parallel plan for it
    (``base_model_tp_plan`` of its config class; ``from_pretrained(tp_plan="auto")``), which ``--strategy fsdp
    --tp_size N`` applies. ``remote_code``: no
    transformers class, the checkpoint brings its modelling code, so loading needs ``--trust_remote_code``.
    """

    name: str
    model_types: tuple[str, ...]
    lora_target_modules: tuple[str, ...] | str
    description: str = ""
    packing_model_types: tuple[str, ...] = ()
    tp_plan: bool = False
    remote_code: bool = False

    def targets(self) -> list[str] | str:
        t = self.lora_target_modules
        return t if isinstance(t, str) else list(t)


_NEOX_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# every architecture packing is checked on (tests/test_packing.py: a sample's logits packed equal its logits alone)
_PACKING = ("llama", "gpt_neox", "gpt2", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")


def _native(name: str, model_type: str, description: str, targets: tuple[str, ...] = _LLAMA_TARGETS) -> "Family":
    """A transformers-native family that packs and has a tensor-parallel plan."""
    return Family(name, (model_type,), targets, description, (model_type,), tp_plan=True)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        _native("llama", "llama", "LLaMA / LLaMA-2/3 and look-alikes"),
        _native("gpt_neox", "gpt_neox", "GPT-NeoX, Pythia", _NEOX_TARGETS),
        _native("polyglot_ko", "gpt_neox", "EleutherAI Polyglot-Ko (GPT-NeoX architecture)", _NEOX_TARGETS),
        Family("gpt2", ("gpt2",), ("c_attn", "c_proj", "c_fc"), "GPT-2 (Conv1D layers; peft sets fan_in_fan_out)",
               ("gpt2",)),
        Family("opt", ("opt",), ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "Meta OPT"),
        Family("bloom", ("bloom",), _NEOX_TARGETS, "BigScience BLOOM"),
        _native("qwen2", "qwen2", "Qwen1.5 / Qwen2 / Qwen2.5 (sliding window past max_window_layers)"),
        _native("qwen3", "qwen3", "Qwen3 dense (q/k norms)"),
        _native("mistral", "mistral", "Mistral 7B, Zephyr and look-alikes (sliding window)"),
        _native("gemma", "gemma", "Gemma 1 (tied embeddings)"),
        _native("gemma2", "gemma2", "Gemma 2 (soft-capping: eager attention; alternating sliding layers)"),
        _native("gemma3", "gemma3_text", "Gemma 3 text-only (Gemma3ForCausalLM; not the multimodal gemma3)"),
        _native("phi3", "phi3", "Phi-3 / 3.5 / Phi-4 (fused qkv_proj, gate_up_proj)",
                ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
        Family("internlm2", ("internlm2",), ("wqkv", "wo", "w1", "w2", "w3"),
               "InternLM2 / 2.5 (its own code: --trust_remote_code)", remote_code=True),
        Family("chatglm", ("chatglm",), _NEOX_TARGETS, "ChatGLM2 / 3, GLM-4 chat (its own code: --trust_remote_code)",
               remote_code=True),
        Family("t5", ("t5", "mt5", "umt5"), ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"),
               "T5, Flan-T5, mT5 (encoder-decoder: SFT only)"),
        Family("auto", (), ALL_LINEAR, "any causal LM; LoRA on all linear layers", _PACKING),
    ]
}

_ALIASES = {
    "gpt-neox": "gpt_neox", "gptneox": "gpt_neox", "neox": "gpt_neox", "pythia": "gpt_neox",
    "polyglot": "polyglot_ko", "polyglot-ko": "polyglot_ko", "polyglotko": "polyglot_ko",
    "gpt": "gpt2", "llama2": "llama", "llama3": "llama", "qwen2.5": "qwen2", "gemma3_text": "gemma3",
    "phi4": "phi3", "chatglm3": "chatglm",
}


def get_family(name: str) -> Family:
    """Look a family up by name (case-insensitive; ``gpt-neox``, ``polyglot-ko`` etc. accepted)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[key]


def lora_targets(name: str) -> list[str] | str:
    """LoRA target module names for a family, or ``"all-linear"``."""
    return get_family(name).targets()


def check_model_type(family: str | Family, model_type: str) -> None:
    """Raise if ``model_type`` is not an architecture of ``family`` (``auto`` accepts everything)."""
    fam = family if isinstance(family, Family) else get_family(family)
    if fam.model_types and model_type not in fam.model_types:
        raise ValueError(f"family {fam.name!r} expects model_type in {fam.model_types}, got {model_type!r}")


def check_remote_code(family: str | Family, trust_remote_code: bool) -> None:
    """Refuse a family that exists only as the checkpoint's own code unless that code may run."""
    fam = family if isinstance(family, Family) else get_family(family)
    if fam.remote_code and not trust_remote_code:
        raise UsageError(f"--model {fam.name}: transformers has no {fam.name} class; its checkpoints run the "
                         "modelling code they ship, so pass --trust_remote_code to allow it")


def supports_packing(family: str | Family, model_type: str) -> bool:
    """Whether padding-free packing keeps samples apart for ``model_type`` under ``family``."""
    fam = family if isinstance(family, Family) else get_family(family)
    return model_type in fam.packing_model_types


def resolve_packing(choice: bool | str, family: str | Family, model_type: str) -> bool:
    """``--packing``: ``"auto"`` packs where the architecture isolates samples; ``True`` where it cannot is
    refused with the fix."""
    fam = family if isinstance(family, Family) else get_family(family)
    ok = supports_packing(fam, model_type)
    if choice == "auto":
        return ok
    if choice and not ok:
        raise UsageError(f"--packing: model_type {model_type!r} (family {fam.name!r}) cannot keep packed samples "
                         f"apart (packing works for {', '.join(_PACKING)}); use --no-packing")
    return bool(choice)


__all__ = ["ALL_LINEAR", "FAMILIES", "Family", "check_model_type", "check_remote_code", "get_family",
           "lora_targets", "resolve_packing", "supports_packing"]
