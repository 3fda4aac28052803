"""Attention backends (``--attn_implementation``): eager and sdpa (coati's packed-segment sdpa under packing)
give the same logits and the same packed SFT loss; the flag reaches the loaded model from every script and
the inference loader; flash attention on a machine without a GPU or its package is one error line, before
anything loads; FlexAttention runs forward on CPU (torch compiles it there too) but trains on a GPU only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coati.dataset import PackingCollator, SFTCollator
from coati.dataset.packing import model_inputs
from coati.errors import UsageError
from coati.models import Actor, packing_attention
from coati.models.loading import ATTN_IMPLEMENTATIONS, attention_kwargs
from coati.models.segment_attention import SEGMENT_SDPA
from coati.trainer import SFTTrainer
from coati.trainer.strategies import NaiveStrategy
from tests import tiny
from tests.scripts import load_script
from tests.test_script_errors import _env

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("examples/train_sft.py", "examples/train_reward_model.py", "examples/train_dpo.py",
           "examples/train_prompts.py")
MAX_LEN = 32
# what config._attn_implementation holds once loaded: coati runs its segment sdpa where sdpa was chosen
LOADED = {"eager": "eager", "sdpa": SEGMENT_SDPA}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_model("llama", tmp_path_factory.mktemp("attn_llama"), vocab_size=256)


def _items() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for n in (5, 11, 3, 8, 7, 2, 9):
        ids = torch.randint(3, 256, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100
        items.append({"input_ids": ids, "labels": labels})
    return items


def _run(model: Actor, packed: bool) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """Padded logits of every sample, the (packed or padded) SFT loss and its gradients."""
    items = _items()
    strategy = NaiveStrategy(seed=0)
    collate = PackingCollator(0, MAX_LEN, attention=packing_attention(model)) if packed else SFTCollator(0)
    trainer = SFTTrainer(model, strategy, strategy.setup_dataloader(items, len(items), collate_fn=collate),
                         log_interval=100)
    with torch.no_grad():
        padded = SFTCollator(0)(items)
        logits = model(padded["input_ids"], attention_mask=padded["attention_mask"])
        logits = logits[padded["attention_mask"].bool()]
    model.zero_grad()
    loss_sum, count, _ = trainer.compute_loss(collate(items))
    loss_sum.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, float(loss_sum.detach()) / int(count), grads


def _load(path: Path, impl: str) -> Actor:
    torch.manual_seed(0)
    return Actor.from_pretrained(path, **attention_kwargs(impl))


def _assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert a[1] == pytest.approx(b[1], abs=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], atol=1e-5, rtol=1e-4, msg=k)


def test_eager_and_sdpa_give_the_same_logits_and_packed_loss(llama_dir):
    """sdpa loads as coati's segment sdpa (packed rows attended sample by sample), eager keeps a dense mask;
    both match each other packed and unpacked, in fp32 on CPU."""
    eager, sdpa = _load(llama_dir, "eager"), _load(llama_dir, "sdpa")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", SEGMENT_SDPA)
    assert (packing_attention(eager), packing_attention(sdpa)) == ("dense", "segments")
    assert eager.model.dtype == torch.float32
    plain = _run(eager, packed=False)
    for model in (eager, sdpa):
        _assert_same(_run(model, packed=True), plain)
    _assert_same(_run(sdpa, packed=False), plain)


def test_flex_attention_runs_on_cpu_but_trains_on_a_gpu_only(llama_dir):
    """torch compiles FlexAttention on CPU and runs it forward (serving), packed rows filling max_len
    ("varlen") with each sample's logits its own; it has no backward there, so training on CPU is refused."""
    with pytest.raises(UsageError, match="flex_attention trains on a CUDA GPU only"):
        attention_kwargs("flex_attention", "cpu")
    torch.manual_seed(0)
    flex = Actor.from_pretrained(llama_dir, **attention_kwargs("flex_attention", "cpu", train=False)).eval()
    assert flex.config._attn_implementation == "flex_attention" and packing_attention(flex) == "varlen"
    eager = _load(llama_dir, "eager").eval()
    items = _items()
    packed = PackingCollator(0, MAX_LEN, attention="varlen")(items)
    padded = SFTCollator(0)(items)
    with torch.no_grad():
        want = eager(padded["input_ids"], attention_mask=padded["attention_mask"])
        got = flex(packed["input_ids"], **model_inputs(packed))
        for i, item in enumerate(items):
            torch.testing.assert_close(got[packed["packed"].sample_ids == i], want[i, :len(item["input_ids"])],
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_the_flag_reaches_the_model_train_sft_loads(impl, llama_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}"}) + "\n" for i in range(4)))
    script = load_script("examples/train_sft.py")
    seen = []
    monkeypatch.setattr(script.SFTTrainer, "fit", lambda self, **kw: seen.append(self.model))
    script.main(["--pretrain", str(llama_dir), "--dataset", str(data), "--save_path", str(tmp_path / "out"),
                 "--attn_implementation", impl, "--batch_size", "2", "--eval_ratio", "0"])
    assert [m.config._attn_implementation for m in seen] == [LOADED[impl]]


def test_every_script_and_the_inference_loader_take_the_flag(llama_dir):
    for path in (*SCRIPTS, "inference/server.py", "inference/chat.py", "inference/generate_answers.py"):
        parser = load_script(path).build_parser()
        action = parser._option_string_actions["--attn_implementation"]
        assert (action.default, tuple(action.choices), bool(action.help)) == ("sdpa", ATTN_IMPLEMENTATIONS, True), path
    from coati.inference.loading import load_model

    model, _ = load_model(llama_dir, device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    model, _ = load_model(llama_dir, device="cpu")
    assert model.config._attn_implementation == "sdpa"  # inference runs transformers' own sdpa


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_is_refused_where_it_cannot_run(impl, monkeypatch):
    with pytest.raises(UsageError, match=f"^--attn_implementation {impl} needs a CUDA GPU and this run is on cpu"):
        attention_kwargs(impl, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flash_attn", "flash_attn_interface", "kernels")
                        else real(name, *a))
    module = "flash_attn" if impl == "flash_attention_2" else "flash_attn_interface"
    with pytest.raises(UsageError, match=f"needs the {module} module .* or the kernels package"):
        attention_kwargs(impl)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("argv, line", [
    (["examples/train_sft.py", "--pretrain", "no_model_here", "--dataset", "unused.jsonl",
      "--attn_implementation", "flash_attention_2"],
     "error: --attn_implementation flash_attention_2 needs a CUDA GPU and this run is on cpu: use sdpa or eager"),
    (["examples/train_sft.py", "--pretrain", "no_model_here", "--dataset", "unused.jsonl",
      "--attn_implementation", "flex_attention"],
     f"error: --attn_implementation flex_attention trains on a CUDA GPU only (torch {torch.__version__} has no "
     "FlexAttention backward on cpu): use sdpa or eager"),
    (["inference/server.py", "tests", "--attn_implementation", "flash_attention_3"],  # a dir: checked before it
     "error: --attn_implementation flash_attention_3 needs a CUDA GPU and this run is on cpu: use sdpa or eager"),
    (["examples/colossal_llama/train.py", "--pretrained", "no_model_here", "--dataset", "unused",
      "--use_flash_attn"],
     "error: --attn_implementation flash_attention_2 needs a CUDA GPU and this run is on cpu: use sdpa or eager"),
])
def test_flash_attention_on_cpu_is_one_error_line(argv, line):
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [line])


def test_use_flash_attn_maps_to_flash_attention_2(monkeypatch):
    """The Colossal-LLaMA recipe's switch is the scripts' --attn_implementation flash_attention_2."""
    recipe = load_script("examples/colossal_llama/train.py")
    asked = []
    monkeypatch.setattr(recipe, "attention_kwargs", lambda name: asked.append(name) or {"attn_implementation": name})
    monkeypatch.setattr(recipe.cli, "setup_logging", lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    for flag in ("--use_flash_attn", "--no-use_flash_attn"):
        with pytest.raises(SystemExit):
            recipe.main(["--pretrained", "x", "--dataset", "y", flag])
    assert asked == ["flash_attention_2", "sdpa"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_gpu_kernels_match_sdpa_packed_and_padded(impl, llama_dir):
    """On CUDA, bf16: each kernel's padded logits and packed SFT loss agree with sdpa's padded ones (run by
    benchmarks/gpu_check.sh; a kernel whose package the machine lacks is skipped, naming it)."""
    try:
        kwargs = attention_kwargs(impl)
    except UsageError as err:
        pytest.skip(str(err))
    runs = []
    for load_kwargs in ({}, kwargs):
        torch.manual_seed(0)
        model = Actor.from_pretrained(llama_dir, torch_dtype=torch.bfloat16, **load_kwargs).cuda()
        items = [{k: v.cuda() for k, v in item.items()} for item in _items()]
        collate = PackingCollator(0, MAX_LEN, attention=packing_attention(model)) if load_kwargs else SFTCollator(0)
        strategy = NaiveStrategy(seed=0)
        trainer = SFTTrainer(model, strategy, strategy.setup_dataloader(_items(), 7, collate_fn=SFTCollator(0)),
                             log_interval=100)
        padded = SFTCollator(0)(items)
        with torch.no_grad():
            logits = model(padded["input_ids"], attention_mask=padded["attention_mask"])
            loss_sum, count, _ = trainer.compute_loss(collate(items))
        runs.append((logits[padded["attention_mask"].bool()].float(), float(loss_sum) / int(count)))
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=5e-2, rtol=5e-2)
    assert runs[1][1] == pytest.approx(runs[0][1], rel=2e-2)
