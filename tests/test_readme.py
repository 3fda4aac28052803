"""README.md: its flag tables are the scripts' --help row for row, it names only files that exist, and its
stage-0 wrapper runs from any directory."""
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
flag_table = load_script("tools/flag_table.py")  # the README generator (a tool, not part of the library)


def test_readme_flag_tables_match_help(capsys):
    assert flag_table.main(["--check", str(ROOT / "README.md")]) == 0, capsys.readouterr().out


def test_check_sees_a_drifted_row(tmp_path):
    readme = (ROOT / "README.md").read_text()
    drifted = tmp_path / "README.md"
    drifted.write_text(readme.replace("| `--lam` | `0.95` |", "| `--lam` | `0.9` |"))
    assert flag_table.main(["--check", str(drifted)]) == 1
    assert flag_table.main(["--write", str(drifted)]) == 0
    assert drifted.read_text() == readme


def test_every_path_the_readme_names_exists():
    named = set(re.findall(r"\b((?:examples|inference|benchmarks|tests)/[\w./-]*\w)", (ROOT / "README.md").read_text()))
    assert "examples/run_pipeline.sh" in named
    assert sorted(p for p in named if not (ROOT / p).exists()) == []


def test_run_pipeline_sh_runs_the_pipeline_from_another_directory(tmp_path):
    out = subprocess.run([str(ROOT / "examples" / "run_pipeline.sh"), "--help"], cwd=tmp_path, text=True,
                         capture_output=True, env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m coati.pipeline") and "--output_dir" in out.stdout
