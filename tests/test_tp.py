"""Tensor parallelism (``--strategy fsdp --tp_size N``) on a 2-D (dp, tp) mesh of gloo processes equals one process:
the same loss curve and weights (fp32: losses within 1e-5, weights within 1e-4), saves plain transformers dirs,
resumes on the same mesh only; flags and families it cannot serve are refused in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coati.errors import UsageError
from coati.trainer.strategies import fsdp, make_strategy
from tests import dist_ppo as h
from tests import tiny
from tests.scripts import torchrun

ROOT = Path(__file__).resolve().parents[1]
needs_fsdp = pytest.mark.skipif(not (fsdp.RUNS_ON_CPU or torch.cuda.is_available()),
                                reason="torch < 2.6 runs FSDP2 on GPUs only")
LOSS_TOL = 1e-5  # fp32: the sharded matmuls only reorder sums
WEIGHT_TOL = 1e-4  # after AdamW steps at lr 1e-3


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _runs(nproc: int, script: str, out: Path, runs: dict[str, list[str]], common: list[str]) -> None:
    """``runs`` (name -> flags) one after another in one torchrun job of ``nproc`` processes."""
    _run([*torchrun(nproc), "tests/fsdp_runs.py", script, str(out), json.dumps(runs), *common])


def _train_losses(save_path: Path) -> list[float]:
    rows = [json.loads(line) for line in (save_path / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()  # plain transformers reloads it


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.dist
@needs_fsdp
def test_sft_tp2_and_dp2_tp2_match_one_process_save_and_resume(tiny_llama_dir, shared_data, tmp_path):
    common = ["--pretrain", str(tiny_llama_dir), "--model", "llama", "--dataset",
              str(shared_data / "sft" / "alpaca_en_demo.json"), "--max_datasets_size", "16", "--max_len", "64",
              "--max_epochs", "1", "--lr", "1e-3", "--log_interval", "1", "--seed", "7", "--accumulation_steps", "1"]
    # one process, batch 2 | tp 2 (dp 1), batch 2 | dp 2 x tp 2, batch 1 per replica: the same global batch
    _run([sys.executable, "examples/train_sft.py", *common, "--batch_size", "2", "--save_path",
          str(tmp_path / "one")])
    tp = ["--strategy", "fsdp", "--tp_size", "2"]
    _runs(2, "examples/train_sft.py", tmp_path, {
        "tp2": [*tp, "--batch_size", "2", "--save_interval", "2"],
        "tp2_resumed": [*tp, "--batch_size", "2", "--resume", str(tmp_path / "tp2" / "checkpoints" / "step_2")],
    }, common)
    gc = ["--grad_checkpoint"]  # recomputed sharded layers give the same gradients
    _runs(4, "examples/train_sft.py", tmp_path, {
        "dp2_tp2": [*tp, *gc, "--batch_size", "1", "--save_interval", "2"],
        "dp2_tp2_resumed": [*tp, *gc, "--batch_size", "1", "--resume",
                            str(tmp_path / "dp2_tp2" / "checkpoints" / "step_2")],
    }, common)

    one = _train_losses(tmp_path / "one")
    assert len(one) >= 4 and one[-1] < one[0]
    one_weights = _weights(tmp_path / "one")
    assert _max_diff(one_weights, _weights(tiny_llama_dir)) > 1e-3  # training moved the weights
    for name in ("tp2", "dp2_tp2"):
        assert _train_losses(tmp_path / name) == pytest.approx(one, abs=LOSS_TOL), name
        assert _max_diff(_weights(tmp_path / name), one_weights) < WEIGHT_TOL, name

    # resumed at step 2 on the same mesh (optimizer shards strided over dp and tp): the same steps 3..N
    for name, mesh in (("tp2", {"dp": 1, "tp": 2}), ("dp2_tp2", {"dp": 2, "tp": 2})):
        resumed = _train_losses(tmp_path / f"{name}_resumed")
        assert resumed == pytest.approx(_train_losses(tmp_path / name)[2:], abs=1e-6), name
        state_dir = tmp_path / name / "checkpoints" / "step_2" / "trainer_state"
        assert json.loads((state_dir / fsdp.SHARDING_FILE).read_text())["mesh"] == mesh


@pytest.mark.dist
@needs_fsdp
@pytest.mark.parametrize("nproc, algos", [(2, ("grpo", "ppo")), (4, ("grpo",))])
def test_rl_under_tp_samples_alike_in_a_tp_group_and_matches_one_process(nproc, algos, tmp_path):
    """tp 2 (dp 1 or 2): greedy generation equals the whole model's token for token (checked on every rank inside
    the job); the ranks of a tp group sample the same responses, dp replicas different ones; one process replaying
    those responses on the same global batch ends 2 episodes of GRPO (and PPO: critic, reference under TP too)
    with the same weights (Adam turns rounding of near-zero gradients into ~1e-5, as in tests/test_rl.py) and
    metrics."""
    script = str(ROOT / "tests" / "dist_rl.py")
    _run([*torchrun(nproc), script, str(tmp_path), "tp", *algos])
    responses = [json.loads((tmp_path / f"responses_rank{r}.json").read_text()) for r in range(nproc)]
    assert responses[0] == responses[1] and responses[0]["grpo"]
    if nproc == 4:
        assert responses[2] == responses[3] and set(responses[0]["grpo"]).isdisjoint(responses[2]["grpo"])
    _run([sys.executable, script, str(tmp_path), "single", *algos])
    start = h.models(seed=0)[0].state_dict()
    for algo in algos:
        want = torch.load(tmp_path / f"actor_{algo}_single_1.pt")
        got = torch.load(tmp_path / f"actor_{algo}_tp_1.pt")
        assert max((want[k] - start[k]).abs().max().item() for k in start) > 1e-3, algo  # it trained
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=3e-5, rtol=0, msg=f"{algo} {k}")
        hist = {m: json.loads((tmp_path / f"history_{m}.json").read_text())[f"{algo}_1"] for m in ("tp", "single")}
        assert len(hist["tp"]) == len(hist["single"]) == 2
        for a, b in zip(hist["tp"], hist["single"]):
            for key in ("critic/score/mean", "actor/pg_loss", "actor/kl_loss", "actor/ppo_kl", "critic/vf_loss",
                        "response_length/mean"):
                if key in b:
                    assert a[key] == pytest.approx(b[key], abs=1e-5), (algo, key)


def test_resume_on_another_mesh_is_refused_naming_both(tmp_path):
    (tmp_path / fsdp.SHARDING_FILE).write_text(json.dumps({"strategy": "fsdp", "world_size": 2,
                                                           "mesh": {"dp": 1, "tp": 2}}))
    strategy = object.__new__(fsdp.FSDPStrategy)  # no process group needed to read the layout file
    strategy.world_size, strategy.rank, strategy.tp_size = 2, 0, 1
    with pytest.raises(UsageError) as err:
        strategy.load_state(tmp_path)
    assert str(err.value) == (f"{tmp_path}: optimizer state is sharded over 2 processes as dp 1 x tp 2; resume with "
                              "--nproc_per_node/--nnodes and --tp_size giving that mesh (this run has 2 processes "
                              "as dp 2 x tp 1)")


def test_a_script_refuses_resuming_on_another_mesh_before_any_model_loads(tmp_path):
    """(``--pretrain`` names no model at all: the refusal comes first.)"""
    state = tmp_path / "checkpoints" / "step_2" / "trainer_state"
    state.mkdir(parents=True)
    torch.save({}, state / "state.pt")
    (state / fsdp.SHARDING_FILE).write_text(json.dumps({"strategy": "fsdp", "world_size": 2,
                                                        "mesh": {"dp": 1, "tp": 2}}))
    proc = subprocess.run([sys.executable, "examples/train_sft.py", "--pretrain", str(tmp_path / "no_model"),
                           "--dataset", str(tmp_path / "unread.jsonl"), "--strategy", "fsdp", "--save_path",
                           str(tmp_path), "--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {state}: optimizer state is sharded over 2 processes as dp 1 x tp 2; "
                                        "resume with --nproc_per_node/--nnodes and --tp_size giving that mesh (this "
                                        "run has 1 process as dp 1 x tp 1)"]


def test_tp_size_needs_fsdp():
    with pytest.raises(ValueError, match=r"^--tp_size 2 needs --strategy fsdp \(tensor parallelism is composed "
                                         r"with FSDP2\), not ddp$"):
        make_strategy("ddp", tp_size=2)


def test_a_family_without_a_plan_is_refused_by_name():
    from coati.trainer.strategies.tensor_parallel import tp_plan

    with pytest.raises(UsageError) as err:
        tp_plan(tiny.gpt2_config(), 2)
    assert str(err.value) == ("--tp_size 2: transformers has no tensor-parallel plan (base_model_tp_plan) for "
                              "model_type 'gpt2'; train it with --tp_size 1")


def test_a_plan_style_coati_does_not_apply_is_refused_by_name():
    from coati.trainer.strategies.tensor_parallel import tp_plan

    config = tiny.llama_config()
    config.base_model_tp_plan = {"layers.*.mlp.experts": "moe_tp_experts"}
    with pytest.raises(UsageError) as err:
        tp_plan(config, 2)
    assert str(err.value) == ("--tp_size 2: llama's tensor-parallel plan uses moe_tp_experts, which coati does not "
                              "apply (it applies colwise, rowwise, colwise_gather_output, rowwise_split_input, "
                              "replicated_with_grad_allreduce); train it with --tp_size 1")


@pytest.mark.dist
@needs_fsdp
@pytest.mark.parametrize("nproc", [2, 4])
def test_every_family_with_a_plan_gets_the_whole_models_gradients(nproc, tmp_path):
    """llama, gpt_neox, qwen2 (biases), qwen3 / gemma3 (per-head q/k norms), phi3 (fused, gathered outputs);
    the checks run inside the job (tests/dist_tp_grads.py), which names every family it passed."""
    done = tmp_path / "done"
    _run([*torchrun(nproc), "tests/dist_tp_grads.py", str(done)])
    assert done.read_text().split() == ["llama", "gpt_neox", "qwen2", "qwen3", "gemma3", "phi3"]


def test_sizes_the_ranks_cannot_split_are_refused():
    from coati.trainer.strategies.tensor_parallel import tp_plan

    assert len(tp_plan(tiny.llama_config(), 2)) == 7  # q, k, v, o, gate, up, down
    with pytest.raises(UsageError) as err:
        tp_plan(tiny.llama_config(), 3)
    assert str(err.value) == ("--tp_size 3: llama's num_attention_heads 4, num_key_value_heads 2, "
                              "intermediate_size 128 must be divisible by it")


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_model("gpt2", tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.mark.parametrize("extra, world, message", [
    (["--model", "gpt2"], "2", "--tp_size 2: transformers has no tensor-parallel plan (base_model_tp_plan) for "
                               "model_type 'gpt2'; train it with --tp_size 1"),
    (["--lora_rank", "4"], "2", "--tp_size 2: LoRA adapters are not tensor-parallel; use --tp_size 1 with "
                                "--lora_rank"),
    ([], "3", "--tp_size 2 must divide the number of processes (3)"),
    (["--strategy", "ddp"], "2", "--tp_size 2 needs --strategy fsdp (tensor parallelism is composed with FSDP2), "
                                 "not ddp"),
])
def test_scripts_refuse_what_tp_cannot_serve_before_loading(extra, world, message, tiny_llama_dir, tiny_gpt2_dir,
                                                            tmp_path, monkeypatch):
    """WORLD_SIZE as torchrun sets it: the refusals come before any process group, data or weights."""
    from tests.scripts import load_script

    monkeypatch.setenv("WORLD_SIZE", world)
    model = tiny_gpt2_dir if "gpt2" in extra else tiny_llama_dir
    argv = ["--pretrain", str(model), "--dataset", str(tmp_path / "unread.jsonl"), "--strategy", "fsdp",
            "--tp_size", "2", "--save_path", str(tmp_path / "out"), *extra]
    with pytest.raises(UsageError) as err:
        load_script("examples/train_sft.py").main(argv)
    assert str(err.value) == message


def test_a_refusal_is_one_error_line_and_status_2(tiny_gpt2_dir, tmp_path):
    proc = subprocess.run([sys.executable, "examples/train_sft.py", "--pretrain", str(tiny_gpt2_dir), "--model",
                           "gpt2", "--dataset", str(tmp_path / "unread.jsonl"), "--strategy", "fsdp", "--tp_size",
                           "2"], cwd=ROOT, env={**_env(), "WORLD_SIZE": "2"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --tp_size 2: transformers has no tensor-parallel plan "
                                        "(base_model_tp_plan) for model_type 'gpt2'; train it with --tp_size 1"]


@pytest.mark.parametrize("plugin, zero, want", [
    ("3d", 1, ("fsdp", {"zero_stage": 2, "tp_size": 2})),
    ("3d", 0, ("fsdp", {"zero_stage": 2, "tp_size": 2})),
    ("fsdp", 1, ("fsdp", {"tp_size": 2})),
    ("gemini", 1, "--tp 2: tensor parallelism runs with --plugin 3d or fsdp, not gemini"),
])
def test_colossal_llama_tp_maps_to_tp_size(plugin, zero, want, tiny_llama_dir, monkeypatch):
    import argparse

    from tests.scripts import load_script

    monkeypatch.setenv("WORLD_SIZE", "4")
    train = load_script("examples/colossal_llama/train.py")
    args = argparse.Namespace(tp=2, plugin=plugin, zero=zero, pretrained=str(tiny_llama_dir))
    if isinstance(want, str):
        with pytest.raises(UsageError) as err:
            train.resolve_strategy(args)
        assert str(err.value) == want
    else:
        assert train.resolve_strategy(args) == want


def test_vllm_rollouts_are_refused_under_tp(tmp_path):
    from types import SimpleNamespace

    from tests.scripts import load_script

    script = load_script("examples/train_prompts.py")
    args = script.build_parser().parse_args(["--pretrain", str(tmp_path), "--prompt_dataset", str(tmp_path / "p"),
                                             "--rollout_engine", "vllm", "--strategy", "fsdp", "--tp_size", "2"])
    with pytest.raises(UsageError) as err:
        script.check_engine(args, SimpleNamespace(tp_size=2, world_size=2))
    assert str(err.value) == ("--rollout_engine vllm with --tp_size 2: each process would run its own engine and "
                              "sample its own responses; use --rollout_engine hf under tensor parallelism")
