"""The worker process: runs cases sent by the parent, one at a time, and answers with rows.

Protocol: JSON lines. The parent's first message configures the worker
(``plugins``, ``base_dir``, ``threads``, ``timing``, ``seed``, ``memory_budget``, and ``profile``:
:func:`harness.measure.profile.request`, with the run directory, when cases are profiled);
each further message is one case (``{"case": {...}}``, with ``"time_only": true`` to
stop after timing) and is answered with
``{"row": {...}, "samples_s": [...]}`` (with ``"restart": "why"`` when the case left the
process's CUDA state poisoned: the worker then exits, and the parent starts a fresh one). The worker answers on a private copy of
its original stdout; fd 1 itself is pointed at stderr, so anything a variant
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
    from harness.engine.plugins import load_plugin
    from harness.engine.runner import run_case
    from harness.measure.timing import TimingConfig

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    for plugin in config.get("plugins", []):
        load_plugin(plugin, config.get("base_dir", "."))
    timing = TimingConfig(**config["timing"])
    channel.write(json.dumps({"ready": os.getpid()}) + "\n")

    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        case = Case(**message["case"])
        result = run_case(case, timing, seed=config.get("seed", 0), memory_budget=config.get("memory_budget"),
                          memory_budget_explicit=bool(config.get("memory_budget_explicit")),
                          on_phase=lambda name: channel.write(json.dumps({"phase": name}) + "\n"),
                          time_only=bool(message.get("time_only")), profile=config.get("profile"))
        restart = {"restart": result.restart} if result.restart else {}
        channel.write(json.dumps({"row": result.row, "samples_s": result.samples_s, **restart}) + "\n")
        if result.restart:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
