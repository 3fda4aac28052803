"""Command-line flags shared by the example scripts, so train_sft / train_reward_model / train_prompts agree.

Flag names follow Coati's so its documented commands run unchanged. Boolean flags are real switches:
``--flag``, ``--no-flag`` and also ``--flag true|false`` (Coati's ``type=bool`` flags turned ``--flag False``
*on*; here it means off). Every script ends with ``cli.run(main)``, which reports user errors in one line.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

from . import launch
from .errors import MissingInputError, UsageError, UserError
from .models.loading import ATTN_IMPLEMENTATIONS, FROZEN_DTYPES, attention_kwargs, checkpoint_is_seq2seq
from .models.families import FAMILIES, check_remote_code
from .utils.config import BoolFlag, Bounded, Parser, add_config_args, config_from_args
from .utils.optim import check_optimizer

# How long a rank other than 0 waits, after a user error, for torchrun to stop it once rank 0 has reported the
# same error and exited; past it, rank 0 did not fail and this rank reports its own error.
RANK0_GRACE_S = 10.0

ATTENTION_HELP = ("attention kernel: sdpa = PyTorch's scaled_dot_product_attention (an architecture without it keeps "
                  "its own, e.g. gemma2's eager), run by coati per packed sample under --packing; eager = plain "
                  "matmuls; flash_attention_2 / _3 need a CUDA GPU and flash-attn (FA3: its hopper build) or "
                  "kernels; flex_attention = torch's FlexAttention (compiled; trains on a CUDA GPU only)")


def make_parser(description: str) -> argparse.ArgumentParser:
    return Parser(description=description)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrain", required=True, help="Hugging Face model dir (or Hub id with a local cache) to start from")
    g.add_argument("--model", default="auto", choices=sorted(FAMILIES),
                   help="model family: picks LoRA target modules (auto = every linear layer)")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --pretrain)")
    g.add_argument("--grad_checkpoint", action=BoolFlag, default=False, help="gradient checkpointing (less memory, ~30%% slower)")
    g.add_argument("--trust_remote_code", action=BoolFlag, default=False, help="allow model code from the model dir")
    g.add_argument("--attn_implementation", default="sdpa", choices=list(ATTN_IMPLEMENTATIONS), help=ATTENTION_HELP)
    g.add_argument("--frozen_dtype", default="auto", choices=list(FROZEN_DTYPES),
                   help="dtype of weights that never train: the base under LoRA and, in PPO, the reference and "
                        "reward models and a shared critic/reward base; auto = the checkpoint's own dtype on a "
                        "GPU, fp32 on CPU (where bf16 / fp16 matmuls are slow). Weights that train are fp32 "
                        "masters whatever the checkpoint's dtype (with --lora_train_bias all|lora_only the base "
                        "holds trained biases and loads in fp32); --quant bases follow --quant_compute_dtype; "
                        "saved models keep the checkpoint's dtype")


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_rank", type=Bounded(int, ">= 0"), default=0, help="LoRA rank; 0 trains all weights")
    g.add_argument("--lora_alpha", type=Bounded(float, "> 0"), default=None, help="LoRA alpha (default: equal to the rank)")
    g.add_argument("--lora_dropout", type=Bounded(float, "[0, 1)"), default=0.0, help="dropout on the LoRA branch")
    g.add_argument("--lora_train_bias", default="none", choices=["none", "all", "lora_only"],
                   help="which biases train alongside LoRA")
    g.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="module names to adapt (default: the family's list; 'all-linear' for every linear layer)")
    g.add_argument("--merge_lora_weights", action=BoolFlag, default=True,
                   help="save LoRA merged into full weights; false saves the adapter only")


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization (needs `pip install coati[quant]`)")
    g.add_argument("--quant", default=None, choices=["8bit", "4bit"],
                   help="load the frozen base quantized with bitsandbytes (8bit = LLM.int8, 4bit = NF4 with double "
                        "quantization) and train LoRA on it; needs --lora_rank > 0 and --strategy naive or ddp")
    g.add_argument("--quant_compute_dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype the quantized layers compute in (and the unquantized weights load in); "
                        "auto = bf16 on GPUs that support it, else fp16, fp32 on CPU")


def add_strategy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distribution and precision")
    g.add_argument("--strategy", default="naive", choices=strategy_names(),
                   help="naive = one process; ddp = torch DDP (launch with torchrun); fsdp = torch FSDP2; "
                        "colossalai_* need `pip install coati[colossalai]` and a GPU")
    g.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                   help="compute precision: matmuls run in bf16 / fp16 under autocast (fsdp: FSDP2's mixed "
                        "precision policy, gradients reduced in fp32) while the weights that train stay fp32 "
                        "masters the optimizer updates; fp16 uses a grad scaler and needs a GPU")
    g.add_argument("--grad_clip", type=Bounded(float, ">= 0"), default=1.0, help="clip the global gradient norm (0 = off)")
    g.add_argument("--seed", type=Bounded(int, ">= 0"), default=42, help="seed for init, shuffling and sampling")
    g.add_argument("--zero_stage", type=int, default=None, choices=[2, 3],
                   help="fsdp only: 2 = parameters stay gathered between forward and backward (ZeRO-2), "
                        "3 = re-shard them after forward (ZeRO-3, least memory); default 3")
    g.add_argument("--cpu_offload", action=BoolFlag, default=None,
                   help="fsdp / colossalai_gemini: keep sharded parameters, gradients and optimizer state in CPU "
                        "memory (colossalai_zero2_cpu offloads by its name)")
    g.add_argument("--placement_policy", default=None, choices=["static", "auto"],
                   help="colossalai_gemini only: static placement or auto (memory-tracer driven); default static")
    g.add_argument("--fsdp_block", nargs="+", default=None,
                   help="fsdp only: class names of the modules sharded one by one (commas also separate); default: "
                        "the model's own (_no_split_modules, e.g. LlamaDecoderLayer)")
    g.add_argument("--tp_size", type=Bounded(int, ">= 1"), default=None,
                   help="fsdp only: tensor-parallel degree: each model's decoder layers are split over this many "
                        "processes by the family's transformers TP plan (DTensor), and FSDP2 shards over the "
                        "rest (world = dp x tp); default: no tensor parallelism")
    g.add_argument("--tf32", action=BoolFlag, default=None,
                   help="TF32 matmuls and convolutions on GPUs that have them (default: torch's setting)")


def add_logging_args(p: argparse.ArgumentParser, save_unit: str = "", **defaults: Any) -> None:
    """The "logging and checkpoints" flags of :class:`~coati.trainer.TrainConfig`, the scripts' ``--save_path
    output`` default and ``--resume``; ``defaults`` are a script's own (train_prompts logs every episode), and
    ``save_unit`` what its ``--save_interval`` counts when not optimizer steps."""
    from .trainer.config import L, SAVE_INTERVAL_HELP, TrainConfig

    groups = add_config_args(p, TrainConfig, only_groups=[L], defaults={"save_path": "output", **defaults})
    if save_unit:
        p._option_string_actions["--save_interval"].help = SAVE_INTERVAL_HELP.format(save_unit)
    groups[L].add_argument("--resume", nargs="?", const="latest", default=None,
                           help="resume from the latest intact checkpoint under --save_path, or from the given "
                                "checkpoint dir")


def add_training_args(p: argparse.ArgumentParser, **defaults: Any) -> argparse._ArgumentGroup:
    """The supervised loop's flags (:class:`~coati.trainer.TrainConfig`; ``defaults``: the script's own, e.g.
    SFT's ``accumulation_steps=8``), logging and checkpoints included; returns the "training" group for a
    script's own additions."""
    from .trainer.config import T, TrainConfig

    groups = add_config_args(p, TrainConfig, only_groups=[T], defaults=defaults)
    add_logging_args(p)
    return groups[T]


def train_config(args: argparse.Namespace) -> Any:
    """The :class:`~coati.trainer.TrainConfig` the flags describe."""
    from .trainer.config import TrainConfig

    return config_from_args(TrainConfig, args)


def strategy_names() -> list[str]:
    from .trainer.strategies import STRATEGIES

    return list(STRATEGIES)


def lora_settings(args: argparse.Namespace):
    from .models.lora import LoraSettings

    targets = args.lora_target_modules
    if targets is not None:  # "q_proj v_proj" and "q_proj,v_proj" both work
        targets = [t for arg in targets for t in arg.split(",") if t]
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        train_bias=args.lora_train_bias, target_modules=targets)


def quant_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``from_pretrained`` keywords for --quant, after refusing combinations that cannot work (no LoRA, a
    sharding strategy; a remote-code --model without --trust_remote_code) before anything loads."""
    from .models.quant import check_quant_lora, check_strategy_support

    check_remote_code(args.model, args.trust_remote_code)
    quant = getattr(args, "quant", None)
    if quant is None:
        return {}
    with flag_errors():
        check_quant_lora(quant, lora_settings(args))
        check_strategy_support(args.strategy, quant=quant)
    return {"quant": quant, "quant_compute_dtype": args.quant_compute_dtype}


def attn_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``from_pretrained`` keywords for --attn_implementation, after refusing (one line, before anything loads) a
    kernel this machine lacks or cannot run."""
    return attention_kwargs(args.attn_implementation)


def add_empty_records_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--empty_records", default="skip", choices=["skip", "raise"],
                       help="records with an empty prompt or response: skip them (counted, and the first named "
                            "by file, record and field in the log) or stop with that error before training")


def strategy_from_args(args: argparse.Namespace, **extra: Any):
    import torch

    from .trainer.strategies import make_strategy

    if getattr(args, "optim", None):  # an --optim these flags cannot train with: one line, before anything loads
        check_optimizer(args.optim, accumulation_steps=args.accumulation_steps, strategy=args.strategy,
                        lora=getattr(args, "lora_rank", 0) > 0, precision=args.mixed_precision,
                        ptx=bool(getattr(args, "pretrain_dataset", None)) and getattr(args, "ptx_coef", 0) != 0)

    if getattr(args, "tf32", None) is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    kwargs = dict(seed=args.seed, mixed_precision=args.mixed_precision, grad_clip=args.grad_clip)
    for name in ("zero_stage", "cpu_offload", "placement_policy", "tp_size"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if kwargs.get("tp_size", 1) > 1:
        check_tensor_parallel(kwargs["tp_size"], args.strategy,
                              [getattr(args, k, None) for k in ("pretrain", "rm_pretrain", "critic_pretrain")],
                              lora=getattr(args, "lora_rank", 0) > 0,
                              trust_remote_code=getattr(args, "trust_remote_code", False))
    if getattr(args, "fsdp_block", None):
        kwargs["block_classes"] = [n for arg in args.fsdp_block for n in arg.split(",") if n]
    kwargs.update(extra)
    with flag_errors():  # the strategy refuses a flag value or combination
        strategy = make_strategy(args.strategy, **kwargs)
    if getattr(args, "resume", None):  # a checkpoint this strategy cannot load: say so before any model loads
        from .trainer.base import resolve_resume

        strategy.check_resume(resolve_resume(args.resume, getattr(args, "save_path", None)) / "trainer_state")
    return strategy


def check_tensor_parallel(tp_size: int, strategy: str, checkpoints: list[str | None], lora: bool = False,
                          trust_remote_code: bool = False) -> None:
    """Refuse ``--tp_size`` where it cannot work, from the flags and the checkpoints' configs only (before any
    process group or weights): another strategy, a world it does not divide, LoRA, a family without a TP plan,
    sizes it cannot split."""
    from .trainer.strategies.tensor_parallel import check_tp_checkpoint

    if strategy != "fsdp":
        raise UsageError(f"--tp_size {tp_size} needs --strategy fsdp (tensor parallelism is composed with FSDP2), "
                         f"not {strategy}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp_size:
        raise UsageError(f"--tp_size {tp_size} must divide the number of processes ({world})")
    if lora:
        raise UsageError(f"--tp_size {tp_size}: LoRA adapters are not tensor-parallel; use --tp_size 1 with "
                         "--lora_rank")
    for path in sorted({p for p in checkpoints if p}):
        check_tp_checkpoint(path, tp_size, trust_remote_code)


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """Library code says ``ValueError`` when given values that cannot work together; at the script edge those
    values are the user's flags: one ``error:`` line (UsageError), no traceback."""
    try:
        yield
    except ValueError as err:
        raise UsageError(str(err)) from None


def setup_logging(rank0: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def rank() -> int:
    """This process's global rank as torchrun sets it (0 outside torchrun), known before any process group."""
    return int(os.environ.get("RANK", "0"))


def run(main: Callable[[], Any]) -> None:
    """Every script's entry point: ``if __name__ == "__main__": cli.run(main)``.

    A :class:`~coati.errors.UserError` (bad data, a missing input, refused flags, a missing optional package)
    ends the program with one ``error: <message>`` line on stderr and status 2, no traceback; any other
    exception is a bug and keeps its traceback. Under torchrun every rank meets the same user error (same
    flags, same data), so rank 0 alone prints it. The other ranks must not exit first, or torchrun would stop
    rank 0 before it prints: they wait up to ``RANK0_GRACE_S`` for torchrun to stop them (exiting with 2 when
    it does), and print the error themselves, marked with their rank, when rank 0 did not fail. Under
    ``python -m coati.launch`` the line goes to the launcher, which prints it after torchrun's own lines.
    """
    try:
        main()
    except UserError as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        if rank() != 0:
            signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
            time.sleep(RANK0_GRACE_S)
            message = f"rank {rank()}: {message}"
        if not launch.hand_over(message):
            print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def add_neftune_args(group: argparse._ArgumentGroup) -> None:
    from .models.neftune import DEFAULT_NEFTUNE_ALPHA

    group.add_argument("--use_neft", action=BoolFlag, default=False,
                       help="NEFTune: uniform noise of scale alpha / sqrt(seq_len * hidden) on the input "
                            "embeddings while training (none in eval)")
    group.add_argument("--neftune_noise_alpha", type=Bounded(float, "> 0"), default=DEFAULT_NEFTUNE_ALPHA,
                       help="NEFTune's alpha (with --use_neft)")


def neftune_from_args(model: Any, args: argparse.Namespace) -> None:
    """Attach NEFTune to ``model`` when ``--use_neft`` is on (before the strategy wraps it)."""
    if args.use_neft:
        from .models.neftune import enable_neftune

        enable_neftune(model, args.neftune_noise_alpha)


def add_batching_args(group: argparse._ArgumentGroup) -> None:
    """``--packing`` and ``--group_by_length``: how training micro-batches are laid out."""
    group.add_argument("--packing", action=BoolFlag, default="auto",
                       help="padding-free packing: each training micro-batch's samples (PPO: the pretraining "
                            "samples) are concatenated into rows without padding (rows as long as the longest "
                            "sample; flash / flex: rows of --max_len (--ptx_max_len); sdpa pairs: one row, each "
                            "side attending by itself), with per-sample position ids and no attention across "
                            "samples: the same loss and gradient as padded batches without the pad compute "
                            "(reward / preference pairs: each pair's shared prompt run once). auto = on where the "
                            "architecture keeps packed samples apart (llama, gpt_neox, gpt2, qwen2/3, mistral, gemma "
                            "1/2/3, phi3; not opt, bloom, remote-code models) and the stage packs (not KTO); "
                            "evaluation batches stay padded")
    group.add_argument("--group_by_length", action=BoolFlag, default=False,
                       help="training batches of similar lengths: the seeded epoch order is cut into groups of 50 "
                            "batches, each sorted by length (less padding without --packing; resumable)")


def packing_from_args(args: argparse.Namespace, stage_packs: bool = True, stage: str = "") -> bool:
    """Resolve ``--packing`` for ``--pretrain``'s architecture before any model loads (``stage_packs=False``:
    the stage's batches cannot be packed, e.g. KTO)."""
    from .models.loading import checkpoint_model_type
    from .models.families import resolve_packing

    if not stage_packs:
        if args.packing is True:
            raise UsageError(f"--packing: {stage} batches are not packed; use --no-packing")
        return False
    return resolve_packing(args.packing, args.model, checkpoint_model_type(args.pretrain, args.trust_remote_code))


def seq2seq_from_args(args: argparse.Namespace) -> bool:
    """Whether ``--pretrain`` is an encoder-decoder model (T5, BART), read from its config before any data
    loads; False where that cannot be read (loading the model then reports why, after any data error)."""
    try:
        return checkpoint_is_seq2seq(args.pretrain, args.trust_remote_code)
    except MissingInputError:
        return False


def group_lengths(args: argparse.Namespace, dataset: Any) -> list[int] | None:
    """Per-sample lengths for ``setup_dataloader(lengths=...)`` under ``--group_by_length``, else None."""
    from .dataset.packing import sample_lengths

    return sample_lengths(dataset) if args.group_by_length else None
