"""README.md's flag tables are the scripts' --help, row for row."""
from coati.utils import flag_table


def test_readme_flag_tables_match_help(capsys):
    assert flag_table.main(["--check", str(flag_table.ROOT / "README.md")]) == 0, capsys.readouterr().out


def test_check_sees_a_drifted_row(tmp_path):
    readme = (flag_table.ROOT / "README.md").read_text()
    drifted = tmp_path / "README.md"
    drifted.write_text(readme.replace("| `--lam` | `0.95` |", "| `--lam` | `0.9` |"))
    assert flag_table.main(["--check", str(drifted)]) == 1
    assert flag_table.main(["--write", str(drifted)]) == 0
    assert drifted.read_text() == readme
