"""README flag tables generated from the scripts' parsers, so ``--help`` and README.md cannot drift apart.

``python tools/flag_table.py`` prints the "Script flags" tables; ``--check README.md`` exits 1 when
README.md differs from them (the test suite runs that check); ``--write README.md`` rewrites them in place.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("examples/train_sft.py", "examples/train_reward_model.py", "examples/train_dpo.py",
           "examples/train_prompts.py")


def _parser(script: str) -> argparse.ArgumentParser:
    if script == "python -m coati.pipeline":
        from coati.pipeline.run import build_parser

        return build_parser()
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"coati_flags_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flag_rows(parser: argparse.ArgumentParser) -> list[str]:
    """One ``| flag | default | meaning |`` row per option, as ``--help`` words it."""
    rows = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue  # hidden: Coati's spellings (coati/compat.py)
        names = [o for o in action.option_strings if not o.startswith("--no-")]
        flag = ", ".join(f"`{n}`" for n in names)
        if len(names) < len(action.option_strings):
            flag += " (`--no-...`)"
        default = action.default
        shown = "" if default is None or isinstance(action, argparse._StoreConstAction) else f"`{default}`"
        meaning = (action.help or "").replace("%%", "%")
        if action.choices:
            meaning += f" ({', '.join(str(c) for c in action.choices)})"
        elif hasattr(action.type, "spec"):  # a Bounded number
            meaning += f" ({action.type.spec})"
        rows.append(f"| {flag} | {shown} | {_cell(meaning)} |")
    return rows


def tables() -> str:
    parts = []
    for script in (*SCRIPTS, "python -m coati.pipeline"):
        parser = _parser(script)
        parts += [f"### `{script}`", "", parser.description, "", "| flag | default | meaning |", "| --- | --- | --- |",
                  *flag_rows(parser), ""]
    return "\n".join(parts)


def readme_section(readme: str) -> str:
    """The tables part of README's "Script flags" section (from its first ``###`` to the next ``##``)."""
    start = readme.index("## Script flags")
    body = readme[start:]
    first = body.index("\n### ") + 1
    end = body.index("\n## ", first)
    return body[first:end].strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", metavar="README", help="exit 1 if this README's tables differ from --help")
    p.add_argument("--write", metavar="README", help="replace this README's tables with the generated ones")
    args = p.parse_args(argv)
    generated = tables().strip("\n") + "\n"
    if args.write:
        readme = Path(args.write).read_text()
        Path(args.write).write_text(readme.replace(readme_section(readme), generated, 1))
        return 0
    if args.check is None:
        sys.stdout.write(generated)
        return 0
    current = readme_section(Path(args.check).read_text())
    if current == generated:
        return 0
    import difflib

    sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), generated.splitlines(True),
                                               "README.md", "--help"))
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
