"""Exact resume of the supervised stages with dropout on (and fp16 loss scaling on a GPU), and trainer state that
loads with ``weights_only=True`` only: a state file holding a pickled object is refused before it can run code."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch

from coati.dataset import RewardCollator, SFTCollator
from coati.models import Actor, RewardModel
from coati.trainer import RewardModelTrainer, SFTTrainer
from coati.trainer.strategies import NaiveStrategy
from tests import tiny

VOCAB = 64
DROPOUT = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
STEPS_PER_EPOCH = 3  # 24 samples, micro-batches of 4, 2 per optimizer step
RESUME_AT = 4  # one optimizer step into the second epoch


def _config():
    return tiny.gpt2_config(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **DROPOUT)


def _ids(g: torch.Generator) -> torch.Tensor:
    return torch.randint(3, VOCAB, (int(torch.randint(6, 13, (1,), generator=g)),), generator=g)


def _sft_data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = _ids(g)
        labels = ids.clone()
        labels[:3] = -100  # a prompt the loss skips
        items.append({"input_ids": ids, "labels": labels})
    return items


def _rm_data(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"chosen_input_ids": _ids(g), "rejected_input_ids": _ids(g)} for _ in range(n)]


STAGES = {
    "sft": (SFTTrainer, Actor, _sft_data, SFTCollator(0)),
    "rm": (RewardModelTrainer, RewardModel, _rm_data, RewardCollator(0)),
}


def _trainer(stage: str, save_path: pathlib.Path, mixed_precision: str | None = None, scaled: bool = False):
    trainer_cls, model_cls, data, collate = STAGES[stage]
    strategy = NaiveStrategy(seed=0, mixed_precision=mixed_precision)
    if scaled:
        # the scale doubles after every finite step and halves (skipping the step) on overflow, so it carries
        # history a resumed run must restore
        strategy.scaler = torch.amp.GradScaler(strategy.device.type, growth_interval=1)
    torch.manual_seed(0)
    model = strategy.prepare_model(model_cls.from_config(_config()))
    train = strategy.setup_dataloader(data(24, seed=1), 4, shuffle=True, collate_fn=collate, drop_last=True)
    held = strategy.setup_dataloader(data(5, seed=2), 4, shuffle=False, collate_fn=collate)
    return trainer_cls(model, strategy, train, held, lr=1e-3, max_epochs=2, accumulation_steps=2,
                       save_path=str(save_path), save_interval=RESUME_AT, log_interval=100)


def _assert_resume_is_exact(stage, tmp_path, mixed_precision=None, scaled=False, tolerance=0.0):
    full = _trainer(stage, tmp_path / "full", mixed_precision, scaled)
    full_hist = full.fit()
    assert len(full_hist) == 2 * STEPS_PER_EPOCH
    resumed = _trainer(stage, tmp_path / "resumed", mixed_precision, scaled)
    res_hist = resumed.fit(resume_from=tmp_path / "full" / "checkpoints" / f"step_{RESUME_AT}")
    assert [h["step"] for h in res_hist] == [h["step"] for h in full_hist]
    after = [h["loss"] for h in full_hist[RESUME_AT:]]
    assert [h["loss"] for h in res_hist[RESUME_AT:]] == pytest.approx(after, abs=tolerance, rel=0)
    assert [e["loss"] for e in resumed.eval_history] == pytest.approx([e["loss"] for e in full.eval_history],
                                                                      abs=tolerance, rel=0)
    return full, resumed


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_resume_with_dropout_gives_the_uninterrupted_loss_curve(stage, tmp_path):
    full, _ = _assert_resume_is_exact(stage, tmp_path)
    # dropout is really on: the same batch gives two different training losses
    batch = next(iter(full.train_dataloader))
    full.model.train()
    with torch.no_grad():
        assert float(full.compute_loss(batch)[0]) != float(full.compute_loss(batch)[0])


def test_resume_restores_the_loss_scale(tmp_path):
    """The GradScaler path on CPU in fp32 (no overflow, so the scale only grows): the resumed run ends on the
    uninterrupted run's scale, not on one restarted from its initial value."""
    full, resumed = _assert_resume_is_exact("sft", tmp_path, scaled=True)
    assert resumed.strategy.scaler.get_scale() == full.strategy.scaler.get_scale() == 2.0 ** 16 * 2 ** len(
        full.history)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_fp16_resume_gives_the_uninterrupted_loss_curve(stage, tmp_path):
    full, resumed = _assert_resume_is_exact(stage, tmp_path, "fp16", scaled=True, tolerance=1e-6)
    assert resumed.strategy.scaler.get_scale() == full.strategy.scaler.get_scale()


class _TouchesAFile:
    """Unpickling this creates ``path``: what any code a hostile checkpoint carries could do."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


@pytest.mark.parametrize("name", ["state.pt", "rng_rank0.pt"])
def test_a_state_file_holding_a_pickled_object_is_refused(name, tmp_path):
    trainer = _trainer("sft", tmp_path / "run")
    trainer.fit()
    ckpt = tmp_path / "run" / "checkpoints" / f"step_{RESUME_AT}"
    state_file = ckpt / "trainer_state" / name
    saved = torch.load(state_file, weights_only=True)  # what coati writes loads as plain data
    marker = tmp_path / "code_ran"
    torch.save({**saved, "extra": _TouchesAFile(marker)}, state_file)
    again = _trainer("sft", tmp_path / "again")
    with pytest.raises(ValueError, match="pickled Python object") as info:
        again.fit(resume_from=ckpt)
    assert str(info.value).startswith(f"{state_file}: refused")
    assert not marker.exists()


def _run_with_checkpoints(tmp_path, every: int = 1):
    trainer = _trainer("sft", tmp_path / "run")
    trainer.train_config = dataclasses.replace(trainer.train_config, save_interval=every)
    trainer.fit()
    return tmp_path / "run"


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "zip bytes"])
def test_resume_skips_a_damaged_newest_checkpoint_with_a_warning_and_a_named_one_is_refused(damage, tmp_path,
                                                                                            caplog):
    """A copy cut short, a header overwritten, flipped bytes in the state zip: ``--resume`` (latest) falls back to
    the newest intact checkpoint, saying which it skipped and why; ``--resume PATH`` to the damaged one is one
    error naming the file and the newest intact checkpoint. Before, the first two died in safetensors."""
    from coati.errors import CheckpointError
    from coati.trainer import resolve_resume

    run = _run_with_checkpoints(tmp_path)
    newest = run / "checkpoints" / f"step_{2 * STEPS_PER_EPOCH}"
    before = run / "checkpoints" / f"step_{2 * STEPS_PER_EPOCH - 1}"
    assert resolve_resume(True, run) == newest
    target = newest / "model" / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "garbage header":
        target.write_bytes(b"\xff" * 16 + data[16:])
    else:
        target = newest / "trainer_state" / "state.pt"
        data = bytearray(target.read_bytes())
        middle = len(data) // 2
        data[middle: middle + 8] = bytes(255 - b for b in data[middle: middle + 8])
        target.write_bytes(data)
    with caplog.at_level("WARNING", logger="coati"):
        assert resolve_resume(True, run) == before
    assert any(str(target) in r.getMessage() and "skipping damaged checkpoint" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(CheckpointError) as info:
        resolve_resume(newest, run)
    message = str(info.value)
    assert "\n" not in message and str(target) in message and message.endswith(f"is {before}")
    # the fallback resumes: the run from it ends with the uninterrupted run's weights
    resumed = _trainer("sft", tmp_path / "resumed")
    resumed.fit(resume_from=before)
    full = _trainer("sft", tmp_path / "full")
    full.fit()
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("failure", ["ENOSPC", "torch.save short write"])
def test_a_save_that_fails_part_way_leaves_the_previous_checkpoint_and_no_half_written_one(failure, tmp_path,
                                                                                          monkeypatch):
    """A full disk while writing the state of step 2 (as open() reports it, and as torch.save does): one
    CheckpointError line saying what failed, no step_2 or step_2.tmp directory, and step_1 still what
    ``--resume`` picks, whole."""
    import errno

    from coati.errors import CheckpointError
    from coati.trainer import resolve_resume
    from coati.trainer.base import damaged_file

    trainer = _trainer("sft", tmp_path / "run")
    trainer.train_config = dataclasses.replace(trainer.train_config, save_interval=1)
    real = trainer.strategy.save_state
    calls = []

    def full_disk(path, state):
        calls.append(path)
        if len(calls) == 2:
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nNo space left")
        return real(path, state)

    monkeypatch.setattr(trainer.strategy, "save_state", full_disk)
    with pytest.raises(CheckpointError) as info:
        trainer.fit()
    want = "No space left on device" if failure == "ENOSPC" else "unexpected pos 64 vs 0"
    assert want in str(info.value) and "step_2" in str(info.value) and "\n" not in str(info.value)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_1"]
    assert resolve_resume(True, tmp_path / "run") == checkpoints / "step_1"
    assert damaged_file(checkpoints / "step_1") is None


def test_early_stopping_ends_after_patience_evaluations_without_gain_and_a_resume_keeps_its_count(tmp_path,
                                                                                              monkeypatch):
    """Held-out pair accuracy 0.5, 0.7, 0.702, 0.69, 0.95, ... at steps 1, 2, 3, ...: with patience 2 and a
    minimum gain of 0.005, steps 3 and 4 gain nothing over 0.7, so the run stops at step 4 of 6 and saves its
    model; resumed from step 3's checkpoint (one stale evaluation behind it) it stops at step 4 too."""
    accuracy = {1: 0.5, 2: 0.7, 3: 0.702, 4: 0.69, 5: 0.95, 6: 0.96}

    def scripted(trainer):
        return lambda: {"acc": accuracy[trainer.global_step]}

    def build(path):
        trainer = _trainer("rm", path)
        trainer.train_config = dataclasses.replace(trainer.train_config, eval_interval=1, save_interval=1,
                                                   early_stop_patience=2, early_stop_min_delta=0.005)
        monkeypatch.setattr(trainer, "evaluate", scripted(trainer))
        return trainer

    full = build(tmp_path / "full")
    assert full.total_steps == 2 * STEPS_PER_EPOCH == 6
    full.fit()
    assert (full.global_step, full.converged) == (4, True)
    assert [e["step"] for e in full.eval_history] == [1, 2, 3, 4]
    assert (tmp_path / "full" / "model.safetensors").exists()
    resumed = build(tmp_path / "resumed")
    resumed.fit(resume_from=tmp_path / "full" / "checkpoints" / "step_3")
    assert resumed.global_step == 4
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
