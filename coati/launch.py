"""``python -m coati.launch [torchrun flags] SCRIPT ARGS``: torchrun, whose run failed on a user error ends with
coati's one ``error: ...`` line and status 2, as a single process does.

torchrun reports a failed worker with a launcher traceback and a ChildFailedError summary of every rank, after
everything the workers printed, so the line :func:`coati.cli.run` prints scrolls away (and torchrun's status
is 1). Under this launcher the workers leave that line in torchrun's per-rank error file instead of printing
it; the launcher prints it last. A run that fails otherwise (a bug, a signal) keeps torchrun's report.
"""
from __future__ import annotations

import json
import os
import sys
import time

ENV = "COATI_LAUNCH"  # set for the workers: hand a user error to this launcher


def hand_over(message: str) -> bool:
    """Under this launcher, leave a user error's message in this worker's error file for it (True); else False."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (os.environ.get(ENV) and path):
        return False
    extra = {"timestamp": str(int(time.time())), "py_callstack": ""}  # torchrun's error file format
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"message": {"message": f"UserError: {message}", "extraInfo": extra}, "coati_error": message}, f)
    return True


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[ENV] = "1"
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        messages = [f.error_file_data.get("coati_error") for _, f in sorted(err.failures.items())]
        message = next((m for m in messages if m), None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
