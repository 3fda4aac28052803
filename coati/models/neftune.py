"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training, of magnitude
``alpha / sqrt(L * d)`` per element (L the batch's padded sequence length, d the hidden size), none in eval.
transformers' own forward hook (the one its Trainer uses) does the work; coati only attaches it."""
from __future__ import annotations

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

DEFAULT_NEFTUNE_ALPHA = 5.0


def enable_neftune(model: nn.Module, alpha: float = DEFAULT_NEFTUNE_ALPHA) -> RemovableHandle:
    """Add NEFTune noise to the input embeddings of an Actor (or a HF causal LM, LoRA or not); returns the
    hook's handle (``handle.remove()`` turns it off). Call before the strategy wraps the model."""
    from transformers.integrations.neftune import activate_neftune

    if alpha <= 0:
        raise ValueError(f"NEFTune noise alpha must be > 0, got {alpha}")
    return activate_neftune(getattr(model, "model", model), alpha)
