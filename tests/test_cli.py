"""The example scripts' command lines: Coati's flags verbatim, real boolean switches, documented flags, numeric
flags refused outside their range in one line."""

import pathlib
import re

import pytest

from tests.scripts import load_script

def _script(name):
    return load_script(f"examples/{name}.py")


@pytest.mark.parametrize("script", ["train_sft", "train_reward_model", "train_dpo"])
def test_every_flag_has_help(script):
    parser = _script(script).build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_coati_sft_command_parses_verbatim():
    args = _script("train_sft").build_parser().parse_args(
        "--pretrain P --model llama --strategy ddp --save_path OUT --dataset F --batch_size 1 "
        "--accimulation_steps 8 --lr 2e-5 --max_datasets_size 512 --max_epochs 1 --lora_rank 16".split())
    assert (args.accumulation_steps, args.lr, args.lora_rank, args.max_datasets_size) == (8, 2e-5, 16, 512)
    assert args.model == "llama" and args.strategy == "ddp"


@pytest.mark.parametrize("argv, expected", [
    ([], True),
    (["--need_optim_ckpt"], True),
    (["--need_optim_ckpt", "False"], False),  # Coati's type=bool made this True
    (["--need_optim_ckpt", "false"], False),
    (["--need_optim_ckpt", "true"], True),
    (["--no-need_optim_ckpt"], False),
])
def test_bool_flags_are_real_switches(argv, expected):
    base = ["--pretrain", "P", "--dataset", "F"]
    args = _script("train_sft").build_parser().parse_args(base + argv)
    assert args.need_optim_ckpt is expected


def test_colossal_llama_train_takes_its_readme_short_flags(capsys):
    parser = _script("colossal_llama/train").build_parser()
    args = parser.parse_args("--pretrained P --dataset D/part-00000 D/part-00001 E/part-00000 -w 0.01 -s 50".split())
    assert (args.weight_decay, args.warmup_steps, args.dataset) == (0.01, 50, ["D/part-00000", "D/part-00001",
                                                                            "E/part-00000"])
    with pytest.raises(SystemExit):  # the short spellings keep the flags' bounds
        parser.parse_args("--pretrained P --dataset D -s -1".split())
    assert "argument -s/--warmup_steps: must be >= 0, got -1" in capsys.readouterr().err


def test_bool_flag_rejects_garbage():
    with pytest.raises(SystemExit):
        _script("train_sft").build_parser().parse_args(["--pretrain", "P", "--dataset", "F", "--grad_checkpoint", "maybe"])


def test_rm_flags():
    args = _script("train_reward_model").build_parser().parse_args(
        "--pretrain P --model gpt_neox --strategy naive --dataset Anthropic/hh-rlhf --subset harmless-base "
        "--loss_fn log_exp --max_len 128 --batch_size 2 --max_epochs 1 --lr 1e-5 --lora_rank 4 --save_path O --test".split())
    assert args.loss_fn == "log_exp" and args.subset == "harmless-base" and args.test is True


@pytest.mark.parametrize("script, flag, records, where", [
    ("train_sft", "--dataset", [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Bye", "output": ""}],
     "line 2: field 'output'"),
    ("train_reward_model", "--dataset",
     [{"prompt": "Q", "chosen": "good", "rejected": "bad"}, {"prompt": "Q", "chosen": "", "rejected": "bad"}],
     "line 2: field 'chosen'"),
    ("train_prompts", "--prompt_dataset", [{"prompt": "Hi"}, {"prompt": "Yo"}, {"prompt": ""}],
     "line 3: field 'prompt'"),
])
def test_empty_records_raise_names_file_line_field_before_any_model_loads(tmp_path, script, flag, records,
                                                                         where):
    import json

    from coati.dataset.io import DatasetFormatError
    from tests import tiny

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok_dir = tmp_path / "tok"
    tiny.tokenizer("llama").save_pretrained(tok_dir)
    argv = ["--pretrain", str(tmp_path / "no_model_here"), "--tokenizer", str(tok_dir), flag, str(data),
            "--save_path", str(tmp_path / "out"), "--empty_records", "raise"]
    if script == "train_prompts":
        argv += ["--reward_fn", "tests/dist_ppo.py:target_share"]
    with pytest.raises(DatasetFormatError) as info:
        _script(script).main(argv)
    assert str(info.value).startswith(f"{data}: {where}: empty")
    assert not (tmp_path / "out").exists()


def test_dpo_flags_build_the_loss_config():
    from coati.errors import UsageError
    from coati.trainer import PreferenceConfig
    from coati.utils.config import config_from_args

    parser = _script("train_dpo").build_parser()
    args = parser.parse_args("--pretrain P --dataset F --loss_type simpo --beta 2.5 --gamma 1.0 "
                             "--precompute_ref_logps".split())
    cfg = config_from_args(PreferenceConfig, args)
    assert (cfg.loss_type, cfg.beta, cfg.gamma, cfg.precompute_ref_logps, cfg.lambda_orpo) == ("simpo", 2.5, 1.0,
                                                                                              True, 0.1)
    with pytest.raises(SystemExit):  # refused by the parser, before any work
        parser.parse_args("--pretrain P --dataset F --label_smoothing 0.7".split())
    with pytest.raises(UsageError, match="label_smoothing"):  # and by the config, for code that builds one
        PreferenceConfig(label_smoothing=0.7)


# Every command line of the project: its numeric flags name their range where they are declared.
PARSERS = {
    **{f"examples/{name}.py": "build_parser" for name in ("train_sft", "train_reward_model", "train_dpo",
                                                          "train_prompts")},
    **{f"examples/colossal_llama/{name}.py": "build_parser" for name in (
        "eval_mc", "make_expand_tokens", "prepare_pretrain_dataset", "prepare_sft_dataset", "train")},
    **{f"inference/{name}.py": "build_parser" for name in ("chat", "server", "benchmark", "generate_answers")},
    "examples/merge_lora.py": "build_parser", "benchmarks/bench_memory.py": "build_parser",
}


def _parsers():
    from coati.pipeline.run import build_parser

    yield "python -m coati.pipeline", build_parser()
    for path, name in PARSERS.items():
        yield path, getattr(load_script(path), name)()


def test_every_numeric_flag_of_every_script_has_bounds():
    from coati.utils.config import Bounded

    unbounded = [(where, a.option_strings) for where, parser in _parsers() for a in parser._actions
                 if a.type in (int, float) and a.choices is None]
    assert unbounded == []
    assert sum(isinstance(a.type, Bounded) for _, parser in _parsers() for a in parser._actions) > 100
    undocumented = [(where, a.option_strings) for where, parser in _parsers() for a in parser._actions
                    if a.option_strings and not a.help]
    assert undocumented == []
    # and the scripts whose parsers are built elsewhere (the benchmarks' shared harness)
    root = pathlib.Path(__file__).resolve().parents[1]
    plain = [f"{path.relative_to(root)}:{n}" for folder in ("examples", "inference", "benchmarks", "coati")
             for path in sorted((root / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"type=(int|float)\b", line) and "choices=" not in line]
    assert plain == []


@pytest.mark.parametrize("spec, inside, outside", [
    (">= 1", ["1", "7"], ["0", "-3"]),
    ("> 0", ["1e-9", "3"], ["0", "-1", "nan"]),
    ("[0, 1)", ["0", "0.5"], ["1", "-0.1"]),
    ("(0, 1]", ["1", "0.2"], ["0", "1.5"]),
])
def test_bounded_accepts_its_range_and_refuses_the_rest_naming_it(spec, inside, outside):
    import argparse

    from coati.utils.config import Bounded

    check = Bounded(float, spec)
    assert [check(v) for v in inside] == [float(v) for v in inside]
    for value in outside:
        with pytest.raises(argparse.ArgumentTypeError, match=rf"must be (in )?{re.escape(spec)}, got {value}"):
            check(value)


@pytest.mark.parametrize("script, flag, value, message", [
    ("train_sft", "--lr", "-1", "argument --lr/--learning_rate: must be > 0, got -1"),
    ("train_sft", "--per_device_train_batch_size", "0",
     "argument --batch_size/--per_device_train_batch_size: must be >= 1, got 0"),
    ("train_reward_model", "--warmup_ratio", "2", "argument --warmup_ratio: must be in [0, 1], got 2"),
    ("train_dpo", "--beta", "0", "argument --beta: must be > 0, got 0"),
    ("train_prompts", "--top_p", "0", "argument --top_p: must be in (0, 1], got 0"),
    ("train_prompts", "--accimulation_steps", "0", "argument --accimulation_steps: must be >= 1, got 0"),
])
def test_a_numeric_flag_out_of_range_is_one_line_naming_flag_and_range(script, flag, value, message, tmp_path):
    """As a user runs it: a subprocess, offline, nothing loaded (the model dir does not exist)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, f"examples/{script}.py", "--pretrain", str(tmp_path / "none"), "--dataset", "d",
            "--prompt_dataset", "p", flag, value]
    if script != "train_prompts":
        argv = [a for a in argv if a not in ("--prompt_dataset", "p")]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {message} (see {script}.py --help)"]


def test_configs_built_in_code_meet_the_flags_ranges():
    from coati.errors import UsageError
    from coati.rl import make_config
    from coati.trainer import TrainConfig

    with pytest.raises(UsageError, match="--lr must be > 0, got -1"):
        TrainConfig(lr=-1)
    with pytest.raises(UsageError, match="--temperature must be > 0, got 0"):
        make_config(temperature=0)
    assert TrainConfig(lr=1e-3, max_steps=5).max_steps == 5


def test_coati_aliases_are_hidden_spellings_of_the_flags_they_stand_for():
    sft, prompts = _script("train_sft").build_parser(), _script("train_prompts").build_parser()
    base = ["--pretrain", "P", "--prompt_dataset", "F"]
    args = prompts.parse_args(base + ["--max_timesteps", "3", "--update_timesteps", "2", "--accimulation_steps", "4"])
    assert (args.num_collect_steps, args.num_update_steps, args.accumulation_steps) == (3, 2, 4)
    assert prompts.parse_args(base).num_collect_steps == 10  # the alias brings no default of its own
    assert "accimulation" not in sft.format_help() and "timesteps" not in prompts.format_help()
