"""The example scripts' command lines: Coati's flags verbatim, real boolean switches, documented flags."""

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
    with pytest.raises(UsageError, match="label_smoothing"):
        config_from_args(PreferenceConfig, parser.parse_args("--pretrain P --dataset F --label_smoothing 0.7".split()))
