"""Sharded strategies: FSDP2 on 2 gloo processes equals DDP (loss curves, saved models), resumes exactly and
trains PPO; the consolidated-copy helper reloads to the same logits; ColossalAI fails clearly without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coati.models import Actor, LoraSettings, RewardModel
from coati.trainer.strategies import fsdp, make_strategy
from tests import tiny
from tests.scripts import torchrun

ROOT = Path(__file__).resolve().parents[1]
needs_fsdp = pytest.mark.skipif(not (fsdp.RUNS_ON_CPU or torch.cuda.is_available()),
                                reason="torch < 2.6 runs FSDP2 on GPUs only")

# name -> extra flags, run in this order inside one torchrun job (tests/fsdp_runs.py)
FSDP_RUNS = {
    "ddp": ["--strategy", "ddp"],
    "z2": ["--strategy", "fsdp", "--zero_stage", "2"],
    "z3": ["--strategy", "fsdp", "--zero_stage", "3", "--save_interval", "2"],
    "z2_offload": ["--strategy", "fsdp", "--zero_stage", "2", "--cpu_offload"],
    "z3_offload": ["--strategy", "fsdp", "--zero_stage", "3", "--cpu_offload"],
}
SHARDED = ["z2", "z3", "z2_offload", "z3_offload"]


def _train_losses(save_path: Path) -> list[float]:
    rows = [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _torchrun(*args: str) -> None:
    cmd = [*torchrun(2), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _run_matrix(script, runs, common, out):
    _torchrun("tests/fsdp_runs.py", script, str(out), json.dumps(runs), *common)


@pytest.mark.dist
@needs_fsdp
def test_fsdp_sft_matches_ddp_saves_the_same_model_and_resumes(tiny_llama_dir, shared_data, tmp_path):
    runs = {
        **FSDP_RUNS,
        "z3_resumed": ["--strategy", "fsdp", "--zero_stage", "3",
                       "--resume", str(tmp_path / "z3" / "checkpoints" / "step_2")],
        "ddp_lora": ["--strategy", "ddp", "--lora_rank", "4", "--merge_lora_weights", "false"],
        "z3_lora": ["--strategy", "fsdp", "--lora_rank", "4", "--merge_lora_weights", "false", "--grad_checkpoint",
                    "--save_interval", "3"],
        "z3_lora_resumed": ["--strategy", "fsdp", "--lora_rank", "4", "--merge_lora_weights", "false",
                            "--resume", str(tmp_path / "z3_lora" / "checkpoints" / "step_3")],
    }
    common = ["--pretrain", str(tiny_llama_dir), "--model", "llama", "--dataset",
              str(shared_data / "sft" / "alpaca_en_demo.json"), "--max_datasets_size", "48", "--max_len", "96",
              "--max_epochs", "1", "--lr", "1e-3", "--log_interval", "1", "--seed", "7",
              "--accumulation_steps", "2", "--batch_size", "2"]
    _run_matrix("examples/train_sft.py", runs, common, tmp_path)

    ddp = _train_losses(tmp_path / "ddp")
    assert len(ddp) >= 5 and ddp[-1] < ddp[0]
    ddp_weights = _weights(tmp_path / "ddp")
    assert _max_diff(ddp_weights, _weights(tiny_llama_dir)) > 1e-3  # training moved the weights
    for name in SHARDED:
        assert _train_losses(tmp_path / name) == pytest.approx(ddp, abs=1e-4), name
        assert _max_diff(_weights(tmp_path / name), ddp_weights) < 1e-4, name

    # resumed at step 2 (model shards, per-rank optimizer shards, scheduler, sampler): the same steps 3..N
    resumed = _train_losses(tmp_path / "z3_resumed")
    assert resumed == pytest.approx(_train_losses(tmp_path / "z3")[2:], abs=1e-6)
    state_dir = tmp_path / "z3" / "checkpoints" / "step_2" / "trainer_state"
    assert json.loads((state_dir / "sharding.json").read_text())["world_size"] == 2
    assert (state_dir / "state_rank1.pt").is_file()

    # LoRA (+ gradient checkpointing inside the sharded layers): the same adapter as DDP's
    assert _train_losses(tmp_path / "z3_lora") == pytest.approx(_train_losses(tmp_path / "ddp_lora"), abs=1e-4)
    a = load_file(str(tmp_path / "ddp_lora" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "z3_lora" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and len(a) == 2 * 7 * 2  # A and B, 7 target modules, 2 layers
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # an adapter checkpoint loads back into the sharded LoRA model (on top of the broadcast base weights)
    assert _train_losses(tmp_path / "z3_lora_resumed") == pytest.approx(_train_losses(tmp_path / "z3_lora")[3:],
                                                                        abs=1e-6)


@pytest.mark.dist
@needs_fsdp
def test_fsdp_reward_model_matches_ddp(tiny_llama_dir, shared_data, tmp_path):
    common = ["--pretrain", str(tiny_llama_dir), "--model", "llama", "--dataset",
              str(shared_data / "preference" / "dpo_en_demo.json"), "--max_datasets_size", "80", "--max_len", "128",
              "--max_epochs", "1", "--lr", "1e-3", "--log_interval", "1", "--seed", "7", "--eval_ratio", "0",
              "--batch_size", "2"]
    runs = {k: v for k, v in FSDP_RUNS.items()}
    _run_matrix("examples/train_reward_model.py", runs, common, tmp_path)

    ddp = _train_losses(tmp_path / "ddp")
    assert len(ddp) >= 5
    ddp_weights = _weights(tmp_path / "ddp")
    ddp_head = load_file(str(tmp_path / "ddp" / "value_head.safetensors"))
    for name in SHARDED:
        assert _train_losses(tmp_path / name) == pytest.approx(ddp, abs=1e-4), name
        assert _max_diff(_weights(tmp_path / name), ddp_weights) < 1e-4, name
        head = load_file(str(tmp_path / name / "value_head.safetensors"))
        assert max(float((head[k] - ddp_head[k]).abs().max()) for k in ddp_head) < 1e-4, name
    # the reloaded reward model scores like the one DDP saved
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916]])
    with torch.no_grad():
        r_ddp = RewardModel.from_pretrained(tmp_path / "ddp")(ids)
        r_z3 = RewardModel.from_pretrained(tmp_path / "z3_offload")(ids)
    assert float(r_z3) == pytest.approx(float(r_ddp), abs=1e-4)


@pytest.mark.dist
@needs_fsdp
def test_fsdp_ppo_reward_rises(tmp_path):
    _torchrun("tests/dist_fsdp_ppo.py", str(tmp_path), "3")
    scores = json.loads((tmp_path / "scores.json").read_text())
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert first < 0.06  # random policy: about 1/64 of the characters are '7'
    assert last > first + 0.15, scores
    # the LoRA run (reference = actor with adapters off) saved a merged actor plain transformers loads
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora" / "model"))
    assert not any("lora" in k for k in actor.state_dict())
    assert _max_diff(actor.state_dict(), _weights(tmp_path / "model")) > 1e-3  # not the full-FT actor
    assert (tmp_path / "model" / "critic" / "value_head.safetensors").is_file()


# ----- single process ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [False, True])
def test_plain_replica_rebuilds_the_model_from_a_full_state_dict(lora, tmp_path):
    """The consolidated copy (used by sharded saves/loads) gives the same logits and writes a dir that
    reloads to them, LoRA merged or not."""
    from coati.trainer.strategies.fsdp import plain_replica

    torch.manual_seed(0)
    settings = LoraSettings(rank=4, alpha=8) if lora else None
    actor = Actor.from_config(tiny.llama_config(vocab_size=64), lora=settings)
    if lora:  # non-zero adapters, so merging matters
        for name, p in actor.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    state = {k: v.clone() for k, v in actor.state_dict().items()}
    replica = plain_replica(actor, state)
    assert all(not p.is_meta for p in replica.parameters())
    ids = torch.tensor([[1, 5, 9, 33, 60, 2]])
    with torch.no_grad():
        expected = actor(ids)
        torch.testing.assert_close(replica(ids), expected, rtol=0, atol=0)
    replica.save_pretrained(tmp_path / "merged", merge_lora=True)
    reloaded = Actor.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), expected, rtol=1e-5, atol=1e-5)


def test_plain_replica_keeps_tied_embeddings(tmp_path):
    from coati.trainer.strategies.fsdp import plain_replica

    torch.manual_seed(0)
    rm = RewardModel.from_config(tiny.gpt2_config(vocab_size=64))
    replica = plain_replica(rm, {k: v.clone() for k, v in rm.state_dict().items()})
    lm = replica.base_lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert float(replica(ids)) == pytest.approx(float(rm(ids)), abs=0)


def test_decoder_layers_are_the_transformer_blocks():
    from coati.trainer.strategies.fsdp import decoder_layers

    for config, cls in ((tiny.llama_config(vocab_size=64), "LlamaDecoderLayer"),
                        (tiny.gpt2_config(vocab_size=64), "GPT2Block")):
        actor = Actor.from_config(config, lora=LoraSettings(rank=2))
        layers = decoder_layers(actor)
        assert [type(m).__name__ for m in layers] == [cls, cls]


def test_resume_with_another_world_size_is_refused(tmp_path):
    from coati.trainer.strategies.fsdp import SHARDING_FILE, FSDPStrategy

    (tmp_path / SHARDING_FILE).write_text(json.dumps({"strategy": "fsdp", "world_size": 4}))
    strategy = object.__new__(FSDPStrategy)  # no process group needed to read the layout file
    strategy.world_size, strategy.rank = 2, 0
    with pytest.raises(ValueError, match="sharded over 4 processes"):
        strategy.load_state(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"zero_stage": 1}, "zero_stage 2 or 3"),
    ({"placement_policy": "auto"}, "colossalai_gemini option"),
])
def test_fsdp_rejects_options_it_does_not_have(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_strategy("fsdp", **kwargs)


def test_fsdp_on_a_torch_without_cpu_fsdp2_fails_clearly(monkeypatch):
    from coati.trainer.strategies.base import StrategyUnavailableError

    monkeypatch.setattr(fsdp, "RUNS_ON_CPU", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StrategyUnavailableError, match=r"needs torch >= 2\.6 .* or --strategy ddp"):
        make_strategy("fsdp", zero_stage=2)


@pytest.mark.parametrize("name", ["naive", "ddp"])
def test_unsharded_strategies_refuse_sharding_flags(name):
    with pytest.raises(ValueError, match="--cpu_offload applies only to --strategy fsdp"):
        make_strategy(name, cpu_offload=True)


@pytest.mark.parametrize("name, instead", [
    ("colossalai_zero2", "--strategy fsdp --zero_stage 2 instead."),
    ("colossalai_zero2_cpu", "--strategy fsdp --zero_stage 2 --cpu_offload instead."),
    ("colossalai_gemini", "--strategy fsdp --zero_stage 3 --cpu_offload instead."),
])
def test_colossalai_strategies_fail_clearly_without_gpu(name, instead, monkeypatch):
    from coati.trainer.strategies.colossalai import StrategyUnavailableError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delitem(sys.modules, "colossalai", raising=False)
    with pytest.raises(StrategyUnavailableError) as info:
        make_strategy(name)
    message = str(info.value)
    assert message == (f"--strategy {name} needs a CUDA GPU (ColossalAI kernels are GPU-only); "
                       f"on this machine use {instead}")
    assert "colossalai" not in sys.modules  # checked before importing anything heavy


def test_colossalai_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    from coati.trainer.strategies.colossalai import StrategyUnavailableError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "colossalai" else real_find_spec(name, *a))
    with pytest.raises(StrategyUnavailableError, match=r"pip install coati\[colossalai\]"):
        make_strategy("colossalai_gemini", placement_policy="auto")


@pytest.mark.parametrize("policy, refused", [("auto", True), ("static", False)])
def test_ppo_refuses_gemini_auto_placement_before_loading_anything(policy, refused):
    """Gemini "auto" plans chunk moves from the first training iteration and refuses inference before it;
    PPO generates first, so the trainer stops at once with the flag to change."""
    from coati.trainer.ppo import PPOTrainer
    from coati.trainer.strategies.colossalai import ColossalAIStrategy

    strategy = object.__new__(ColossalAIStrategy)  # no GPU here: only the settings the check reads
    strategy.name, strategy.placement_policy = "colossalai_gemini", policy
    if not refused:
        strategy.check_ppo()
        return
    with pytest.raises(ValueError, match="use --placement_policy static"):
        PPOTrainer(strategy, actor=None, critic=None, tokenizer=None, reward_fn=lambda *a, **k: [])


@pytest.mark.parametrize("name, offload, policy", [
    ("colossalai_zero2", False, "static"), ("colossalai_zero2_cpu", True, "static"),
    ("colossalai_gemini", True, "static"), ("colossalai_gemini", False, "auto"),
])
def test_colossalai_calls_match_the_installed_api(name, offload, policy):
    """The installed ColossalAI (CI installs 0.5.0 without its dependencies) takes every argument and has
    every method and attribute the strategy uses; the GPU-only code is otherwise not run here."""
    if not os.environ.get("CI"):  # CI installs it: a broken install must fail there, not skip
        pytest.importorskip("colossalai")
    import inspect

    import colossalai
    import colossalai.booster.plugin as plugins
    from colossalai.booster import Booster
    from colossalai.booster.plugin.low_level_zero_plugin import LowLevelZeroModel
    from colossalai.interface import ModelWrapper, OptimizerWrapper
    from colossalai.nn.optimizer import CPUAdam, FusedAdam, HybridAdam
    from colossalai.tensor.param_op_hook import ColoParamOpHookManager
    from colossalai.zero.gemini.gemini_ddp import GeminiDDP
    from colossalai.zero.gemini.gemini_mgr import GeminiManager

    from coati.trainer.strategies.colossalai import hybrid_adam_args, plugin_spec

    cls_name, kwargs = plugin_spec(name, "bf16", 1.0, offload, policy)
    inspect.signature(getattr(plugins, cls_name)).bind(**kwargs)
    assert kwargs["max_norm"] == 1.0 and kwargs["precision"] == "bf16"
    assert kwargs.get("cpu_offload", kwargs.get("offload_optim_frac", 0.0) > 0) == offload
    model = torch.nn.Linear(3, 2)
    groups, extra = hybrid_adam_args(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01))
    inspect.signature(HybridAdam).bind(groups, **extra)
    assert all(issubclass(c, torch.optim.Optimizer) for c in (CPUAdam, FusedAdam))  # _as_hybrid_adam's checks
    assert groups[0]["weight_decay"] == 0.01 and extra == {"adamw_mode": True}
    inspect.signature(Booster).bind(plugin=None)
    inspect.signature(Booster.boost).bind(Booster, model=model, optimizer=None)
    inspect.signature(Booster.backward).bind(Booster, torch.zeros(()), None)
    inspect.signature(colossalai.launch_from_torch).bind(seed=0, verbose=False)
    inspect.signature(GeminiDDP.state_dict).bind(GeminiDDP, only_rank_0=True)
    assert callable(ColoParamOpHookManager.use_hooks)
    gemini_init = inspect.getsource(GeminiDDP.__init__)
    for attr in ("self.hooks", "self.scatter_after_inference", "self.gemini_manager", "self.chunk_manager"):
        assert attr in gemini_init
    assert issubclass(GeminiDDP, ModelWrapper) and issubclass(LowLevelZeroModel, ModelWrapper)
    assert isinstance(GeminiManager.need_warmup, property)
    inspect.signature(GeminiDDP.load_state_dict).bind(GeminiDDP, {}, strict=False)
    for cls, methods in ((GeminiDDP, ("unwrap", "_post_forward")),
                         (GeminiManager, ("is_warmup", "reset_attributes")),
                         (LowLevelZeroModel, ("unwrap", "_force_wait_all_gather", "update_master_params"))):
        assert all(callable(getattr(cls, m, None)) for m in methods), cls
    assert "self.optim = " in inspect.getsource(OptimizerWrapper.__init__)  # what base_optimizer returns
    for opt in ("colossalai.zero.low_level.low_level_optim.LowLevelZeroOptimizer",
                "colossalai.zero.gemini.gemini_optimizer.GeminiOptimizer"):
        module, _, cls = opt.rpartition(".")
        klass = getattr(__import__(module, fromlist=[cls]), cls)
        assert issubclass(klass, OptimizerWrapper)
        assert all(callable(getattr(klass, m, None))
                   for m in ("backward", "step", "zero_grad", "get_grad_norm", "state_dict", "load_state_dict"))


# ----- multi-node launcher ------------------------------------------------------------------------------------

def test_multinode_dry_run_prints_one_torchrun_per_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two GPU nodes and one default\nnode-a 8\nnode-b slots=4\n\n10.0.0.3  # default slots\n")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "multinode.sh"), "--hostfile", str(hostfile),
                           "--nproc_per_node", "2", "--master_port", "29999", "--dry-run", "--",
                           "examples/train_sft.py", "--pretrain", "my model", "--strategy", "fsdp"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert [c.split()[3] for c in commands] == ["node-a", "node-b", "10.0.0.3"]
    for rank, (command, slots) in enumerate(zip(commands, [8, 4, 2])):
        assert command.startswith("ssh ")
        assert (f"--nnodes 3 --node_rank {rank} --nproc_per_node {slots} --rdzv_backend static" in command)
        assert "--rdzv_endpoint node-a:29999 examples/train_sft.py --pretrain my\\ model --strategy fsdp" in command


# A Slurm allocation of 2 nodes x 2 tasks, faked: scontrol expands the node list, srun starts its command once
# per node with that node's SLURM_NODEID (as `srun --ntasks-per-node=1` does), concurrently.
_FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM_LOG/scontrol"
[[ "$1 $2" == "show hostnames" ]] && printf '%s\\n' $FAKE_SLURM_HOSTS
"""
_FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM_LOG/srun"
while [[ "$1" == --* ]]; do [[ "$1" == --nodes=* ]] && nodes="${1#--nodes=}"; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
_TRAIN = ["examples/train_sft.py", "--pretrain", "my model", "--strategy", "fsdp"]


def _slurm(tmp_path, *args, hosts="gpu07 gpu08", **slurm_env):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in (("scontrol", _FAKE_SCONTROL), ("srun", _FAKE_SRUN)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", FAKE_SLURM_LOG=str(tmp_path), FAKE_SLURM_HOSTS=hosts)
    env.update({"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_CPUS_ON_NODE": "16", **slurm_env})
    return subprocess.run(["bash", str(ROOT / "examples" / "slurm.sh"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def _node_argv(rank, nproc=2, port=29500):
    return ["python3", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
            str(nproc), "--rdzv_backend", "static", "--rdzv_id", "4242", "--rdzv_endpoint", f"gpu07:{port}", *_TRAIN]


def test_slurm_dry_run_prints_the_srun_command_and_each_nodes_torchrun(tmp_path):
    proc = _slurm(tmp_path, "--dry-run", "--", *_TRAIN, SLURM_NTASKS_PER_NODE="2")
    assert proc.returncode == 0, proc.stderr
    launch = ("python3 -m torch.distributed.run --nnodes 2 --node_rank \"$SLURM_NODEID\" --nproc_per_node 2 "
              "--rdzv_backend static --rdzv_id 4242 --rdzv_endpoint gpu07:29500 examples/train_sft.py --pretrain "
              "my\\ model --strategy fsdp")
    assert proc.stdout.splitlines() == [
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=16 bash -c "
        f"'exec {launch}'",
        "# node 0: gpu07 (2 processes)",
        " ".join(_node_argv(0)).replace("my model", "my\\ model"),
        "# node 1: gpu08 (2 processes)",
        " ".join(_node_argv(1)).replace("my model", "my\\ model"),
    ]
    assert (tmp_path / "scontrol").read_text() == "show hostnames gpu[07-08]\n"
    assert not (tmp_path / "srun").exists()  # a dry run starts nothing
    # GPUs per node win over tasks per node (--gpus-per-node=TYPE:N too); DRY_RUN=1 is --dry-run
    proc = _slurm(tmp_path, "--master_port", "29611", "--", *_TRAIN, DRY_RUN="1", SLURM_NTASKS_PER_NODE="1",
                  SLURM_GPUS_PER_NODE="a100:4")
    assert proc.stdout.splitlines()[2] == " ".join(_node_argv(0, 4, 29611)).replace("my model", "my\\ model")


def test_slurm_srun_runs_exactly_those_torchrun_commands(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_SLURM_LOG/node$SLURM_NODEID"\n')
    fake_python.chmod(0o755)
    proc = _slurm(tmp_path, "--python", str(fake_python), "--", *_TRAIN, SLURM_GPUS_ON_NODE="2")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "srun").read_text().startswith("--nodes=2 --ntasks=2 --ntasks-per-node=1 ")
    for rank in (0, 1):
        assert (tmp_path / f"node{rank}").read_text().splitlines() == _node_argv(rank)[1:]


def test_slurm_refuses_to_guess(tmp_path):
    proc = _slurm(tmp_path, "--", *_TRAIN)  # neither GPUs nor tasks per node known
    assert proc.returncode == 2 and "--nproc_per_node" in proc.stderr
    proc = _slurm(tmp_path, "--", *_TRAIN, SLURM_JOB_NODELIST="")
    assert proc.returncode == 2 and "no Slurm allocation" in proc.stderr


@pytest.mark.dist
def test_slurm_runs_two_local_nodes(tmp_path):
    """Both fake nodes are this machine: srun's two tasks each start one torchrun, one world of 2."""
    script = tmp_path / "where.py"
    script.write_text("import os, pathlib, sys\n"
                      "pathlib.Path(sys.argv[1], os.environ['RANK']).write_text(os.environ['GROUP_RANK'] + ' '"
                      " + os.environ['WORLD_SIZE'])\n")
    proc = _slurm(tmp_path, "--python", sys.executable, "--master_port", "29645", "--", str(script), str(tmp_path),
                  hosts="localhost localhost", SLURM_NTASKS_PER_NODE="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "0").read_text() == "0 2" and (tmp_path / "1").read_text() == "1 2"


@pytest.mark.dist
def test_multinode_runs_two_local_nodes(tmp_path):
    """Two hostfile lines that are both this machine: node ranks follow the file, one world of 2."""
    script = tmp_path / "where.py"
    script.write_text("import os, pathlib, sys\n"
                      "pathlib.Path(sys.argv[1], os.environ['RANK']).write_text(os.environ['GROUP_RANK'] + ' '"
                      " + os.environ['WORLD_SIZE'])\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 1\nlocalhost 1\n")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "multinode.sh"), "--hostfile", str(hostfile),
                           "--python", sys.executable, "--master_port", "29644", "--", str(script), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "0").read_text() == "0 2" and (tmp_path / "1").read_text() == "1 2"
