"""User errors end a script with one ``error: ...`` line on stderr and status 2; bugs keep their traceback.

The scripts run as subprocesses, as a user runs them. Data errors come before any model loads, so no model
is needed: ``--pretrain`` names a directory that does not exist.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny
from tests.scripts import torchrun

ROOT = Path(__file__).resolve().parents[1]
GOOD_SFT = {"instruction": "Hi", "output": "Hello"}
REWARD = ["--reward_fn", "tests/dist_ppo.py:target_share"]


def _env() -> dict:
    """As users on offline clusters run: with the Hub switched off, nothing may print before the one line
    (bitsandbytes, imported by peft, had `kernels` say it skips a Hub check on every start)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tiny.tokenizer("llama").save_pretrained(path)
    return path


def _base_argv(script: str, tmp_path: Path, tok_dir: Path) -> list[str]:
    return [sys.executable, f"examples/{script}.py", "--pretrain", str(tmp_path / "no_model_here"),
            "--tokenizer", str(tok_dir), "--save_path", str(tmp_path / "out")]


# (script, flag holding the bad file, middle record, where and why, extra flags)
CASES = {
    "sft": ("train_sft", "--dataset", {"instruction": "Yo", "output": 5},
            "line 2: field 'output': expected a string, got int", []),
    "rm": ("train_reward_model", "--dataset", {"prompt": "Q", "chosen": ["good"], "rejected": "bad"},
           "line 2: field 'chosen': expected a string, got list", []),
    "prompts": ("train_prompts", "--prompt_dataset", {"prompt": 7},
                "line 2: field 'prompt': expected a string, got int", REWARD),
    "ptx": ("train_prompts", "--pretrain_dataset", {"instruction": "Yo", "output": ["Hey"]},
            "line 2: field 'output': expected a string, got list", REWARD),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_middle_line_is_one_error_line_and_status_2(case, tmp_path, tok_dir):
    script, flag, bad, where, extra = CASES[case]
    good = GOOD_SFT if script != "train_reward_model" else {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    data = _jsonl(tmp_path / "data.jsonl", [good, bad, good])
    argv = _base_argv(script, tmp_path, tok_dir) + [flag, str(data), *extra]
    if flag == "--pretrain_dataset":
        argv += ["--prompt_dataset", str(_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}]))]
    proc = _run(argv)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1] == f"error: {data}: {where}", proc.stderr[-3000:]
    if flag == "--pretrain_dataset":  # the prompt file, read before it, loaded fine and logged so
        assert len(lines) == 2 and lines[0].endswith(f"coati: prompt {argv[-1]}: 1 samples")
    else:
        assert len(lines) == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_refused_flag_combination_is_one_error_line(tmp_path, tok_dir):
    argv = _base_argv("train_sft", tmp_path, tok_dir) + ["--dataset", "unused.jsonl", "--quant", "4bit"]
    proc = _run(argv)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --quant 4bit trains LoRA adapters on a frozen quantized base: "
                                        "set --lora_rank > 0"]


def test_an_eval_split_that_leaves_nothing_to_train_is_one_error_line(tmp_path, tok_dir):
    """Before, the reward model's default --eval_ratio on a file of one pair ended in a ValueError traceback."""
    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "good", "rejected": "bad"}])
    proc = _run(_base_argv("train_reward_model", tmp_path, tok_dir) + ["--dataset", str(data)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == ("error: --eval_ratio 0.05 holds out all 1 usable records and leaves none "
                                            "to train on: give more data, --eval_ratio 0, or --eval_dataset")


@pytest.mark.parametrize("script, flag", [("train_sft", "--dataset"), ("train_dpo", "--dataset"),
                                          ("train_prompts", "--prompt_dataset")])
def test_a_model_dir_that_does_not_exist_is_one_error_line(script, flag, tmp_path, tok_dir):
    """Loading a path that is not there, transformers reports an invalid Hub id in a traceback."""
    record = {"prompt": "Q", "chosen": "good", "rejected": "bad"} if script == "train_dpo" else GOOD_SFT
    argv = _base_argv(script, tmp_path, tok_dir) + [flag, str(_jsonl(tmp_path / "d.jsonl", [record] * 4))] + (
        REWARD if script == "train_prompts" else [])
    proc = _run(argv + ["--eval_ratio", "0"] if script == "train_dpo" else argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (f"error: {tmp_path / 'no_model_here'}: no such model directory (nor a "
                                            f"Hugging Face Hub id in the local cache)")
    assert "Traceback" not in proc.stderr


def test_merge_lora_on_a_non_adapter_dir_is_one_error_line(tmp_path):
    proc = _run([sys.executable, "examples/merge_lora.py", str(tmp_path), str(tmp_path / "out")])
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2, [f"error: {tmp_path}: no adapter_config.json (is it already a merged model dir?)"])


@pytest.mark.parametrize("records, where", [
    (None, "no such file or directory"),
    ([{"question_id": 1, "text": "Hi"}, {"question_id": 2, "txt": "Yo"}],
     "line 2: unknown prompt format; keys seen: ['question_id', 'txt']; expected one of the fields ['messages', "
     "'conversations', 'prompt', 'instruction', 'question', 'text', 'source']"),
])
def test_generate_answers_bad_question_file_is_one_error_line_before_the_model(records, where, tmp_path):
    """The model dir does not exist either: the question file is checked first, and nothing is written."""
    questions = tmp_path / "q.jsonl" if records is None else _jsonl(tmp_path / "q.jsonl", records)
    proc = _run([sys.executable, "inference/generate_answers.py", "--model_path", str(tmp_path / "no_model_here"),
                 "--question_file", str(questions), "--output_file", str(tmp_path / "out" / "a.jsonl")])
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [f"error: {questions}: {where}"])
    assert not (tmp_path / "out").exists()


def _run_patched(setup: str, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run a script as ``__main__`` after ``setup`` (Python source) has patched coati in the same process."""
    code = f"import runpy, sys\n{setup}\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code, *argv[1:]], cwd=ROOT, env={**_env(), **env},
                          capture_output=True, text=True, timeout=300)


def test_a_bug_inside_main_keeps_its_traceback(tmp_path, tok_dir):
    """A TypeError is not a user error: the traceback stays and the status is Python's 1, not 2."""
    data = _jsonl(tmp_path / "data.jsonl", [GOOD_SFT])
    setup = ("import coati.utils.tokenizer as t\n"
             "def broken(*a, **k):\n    raise TypeError('internal bug')\n"
             "t.load_tokenizer = broken")
    proc = _run_patched(setup, _base_argv("train_sft", tmp_path, tok_dir) + ["--dataset", str(data)])
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("TypeError: internal bug")
    assert not any(line.startswith("error: ") for line in proc.stderr.splitlines())


def test_other_rank_reports_its_error_when_rank_0_does_not_stop_it(tmp_path, tok_dir):
    """Without a failing rank 0 (nobody stops this rank), rank 1 prints its own error after the wait."""
    data = _jsonl(tmp_path / "data.jsonl", [GOOD_SFT, {"instruction": "Yo", "output": 5}])
    proc = _run_patched("import coati.cli as c\nc.RANK0_GRACE_S = 0.0",
                        _base_argv("train_sft", tmp_path, tok_dir) + ["--dataset", str(data)], RANK="1")
    assert (proc.returncode, proc.stderr.splitlines()) == (
        2, [f"error: rank 1: {data}: line 2: field 'output': expected a string, got int"])


@pytest.mark.dist
def test_torchrun_prints_the_error_once(tmp_path, tok_dir):
    """Both ranks hit the bad line; rank 0 alone reports it and every rank exits with status 2."""
    data = _jsonl(tmp_path / "data.jsonl", [GOOD_SFT, {"instruction": "Yo", "output": 5}, GOOD_SFT])
    launcher = torchrun(2)
    argv = launcher + _base_argv("train_sft", tmp_path, tok_dir)[1:] + ["--dataset", str(data), "--strategy", "ddp"]
    proc = _run(argv, timeout=600)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {data}: line 2: field 'output': expected a string, got int"], output[-4000:]
    # no rank printed a traceback through coati's code (torchrun's own summary may name a venv inside ROOT)
    assert not any(f'File "{ROOT / part}' in output for part in ("coati/", "examples/", "tests/")), output[-4000:]
    assert output.count("exitcode  : 2") == 2, output[-4000:]  # torchrun's report: both ranks, status 2
    assert proc.returncode != 0


def _launch(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m coati.launch`` (torchrun's flags), 2 processes; stdout and stderr as one stream, in order."""
    launcher = [sys.executable, "-m", "coati.launch", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(launcher + argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)


@pytest.mark.dist
def test_coati_launch_ends_a_failed_run_with_the_one_error_line(tmp_path, tok_dir):
    """Colossal-LLaMA's train.py on 2 processes with a --dataset that is not there: the ColossalAI fallback is
    logged once (rank 0), and the last line is coati's error, once, after torchrun's own lines; status 2."""
    missing = tmp_path / "no_such_data"
    proc = _launch(["examples/colossal_llama/train.py", "--pretrained", str(tok_dir), "--dataset", str(missing),
                    "--mixed_precision", "no", "--save_dir", str(tmp_path / "out")])
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-1] == f"error: {missing}: no such prepared dataset dir", proc.stdout[-4000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, proc.stdout[-4000:]
    assert proc.stdout.count("Falling back to --strategy fsdp") == 1, proc.stdout[-4000:]
    assert "ChildFailedError" not in proc.stdout and "Traceback" not in proc.stdout, proc.stdout[-4000:]
    assert proc.returncode == 2


@pytest.mark.dist
def test_coati_launch_keeps_torchrun_report_for_other_failures(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit(3)\n")
    proc = _launch([str(script)])
    assert "ChildFailedError" in proc.stdout and "exitcode  : 3" in proc.stdout, proc.stdout[-4000:]
    assert not any(line.startswith("error: ") for line in proc.stdout.splitlines())
    assert proc.returncode == 1
