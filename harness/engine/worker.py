"""The worker process: runs cases sent by the parent, one at a time, and answers with rows.

Protocol: JSON lines. The parent's first message configures the worker: the run's
:class:`harness.core.config.RunSettings` as JSON (plugins, base directory, threads, timing, seed,
memory budget, and ``profile``: :func:`harness.measure.profile.request`, with the run directory,
when cases are profiled);
each further message is one case (``{"case": {...}}``, with ``"time_only": true`` to
stop after timing) and is answered with what the worker measured of it in this process,
``{"row": {...}, "samples_s": [...]}`` (the row's derived columns are left to the parent:
:mod:`harness.measure.derive`) (with ``"restart": "why"`` when the case left the
process's CUDA state poisoned: the worker then exits, and the parent starts a fresh one). The
worker answers on a private copy of its original stdout; fd 1 itself is pointed at stderr, so anything a variant
prints (from Python or C) cannot corrupt the protocol and ends up in the
stderr log the parent reads when a worker dies. End of input ends the worker.
"""

from __future__ import annotations

import json
import os
import sys


def _protocol_channel():
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def main() -> int:
    channel = _protocol_channel()
    config_line = sys.stdin.readline()
    if not config_line:
        return 0
    config = json.loads(config_line)
    import torch  # in the environment the parent gave: the worker sets no variable of its own

    from harness.core.cases import Case
    from harness.core.config import RunSettings
    from harness.engine.plugins import load_plugin
    from harness.engine.runner import run_case

    settings = RunSettings.from_json(config)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    for plugin in settings.plugins:
        load_plugin(plugin, settings.base_dir)
    channel.write(json.dumps({"ready": os.getpid()}) + "\n")

    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        case = Case(**message["case"])
        result = run_case(case, settings, on_phase=lambda name: channel.write(json.dumps({"phase": name}) + "\n"),
                          time_only=bool(message.get("time_only")))
        restart = {"restart": result.restart} if result.restart else {}
        channel.write(json.dumps({"row": result.row, "samples_s": result.samples_s, **restart}) + "\n")
        if result.restart:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
