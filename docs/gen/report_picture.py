"""The README's picture of a report: one chart of the committed nightly baseline, drawn by the report's own code.

    python docs/gen/report_picture.py [RUN] [-o docs/images/report-nightly-cpu.svg]

Renders the run's report context (``reports.render.build_context``, as ``bench report`` does) and
writes its first scaling chart (time, throughput and peak memory against sequence length, one line
per variant, with the measured exponents) as a standalone SVG. Re-run it after the baseline is
promoted again (``bench baseline set``) and commit the image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUN = ROOT / "results" / "baseline" / "nightly-cpu"
OUT = ROOT / "docs" / "images" / "report-nightly-cpu.svg"


def picture(run: Path = RUN, index: int = -1) -> str:
    """The SVG of the run's scaling chart ``index`` (default: the last configuration, causal)."""
    from reports.render import build_context

    charts = build_context(run)["charts"]
    if not charts:
        raise SystemExit(f"{run}: no scaling chart (no ok rows over several lengths)")
    svg = charts[index]["svg"]
    if 'xmlns="http://www.w3.org/2000/svg"' not in svg:
        svg = svg.replace("<svg", '<svg xmlns="http://www.w3.org/2000/svg"', 1)
    return '<?xml version="1.0" encoding="utf-8" standalone="no"?>\n' + svg + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", type=Path, default=RUN)
    p.add_argument("-o", "--output", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(picture(args.run))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
