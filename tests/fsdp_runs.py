"""Several example-script trainings in one torchrun job, one after another (one process start-up for all).

    torchrun --nproc_per_node=2 tests/fsdp_runs.py SCRIPT OUT RUNS_JSON COMMON_ARGS...

``RUNS_JSON`` maps a run name to its extra flags; run NAME calls ``SCRIPT``'s ``main(COMMON_ARGS + flags +
["--save_path", OUT/NAME])``, in order, so a later run may resume from an earlier run's checkpoint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.scripts import load_script  # noqa: E402


def main(script: str, out: str, runs_json: str, common: list[str]) -> None:
    example = load_script(script)
    for name, flags in json.loads(runs_json).items():
        example.main([*common, *flags, "--save_path", str(Path(out) / name)])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
