"""The results site: static pages built from the run history, readable offline and from the file system.

Pages (all at the top of the site, so relative links work from a file system and from any web path):

* ``index.html`` — every suite on every machine with its latest status, regressed ones first;
* ``suite-<suite>.html`` — per machine, every case's median time per run with its interval, change
  points marked at their run and commit, baseline promotions marked, values on hover (SVG ``<title>``);
  the runs with links to their reports and comparisons;
* ``regressions.html`` — the change points of the last N runs of each suite and machine;
* ``feed.xml`` — an Atom feed of those that are regressions (slower);
* ``runs/<run_id>/report.html`` — the report of each suite and machine's latest run, regenerated here
  from the run's data (:func:`reports.render.render_report`, every value escaped); a run directory's
  own ``report.html`` and ``compare.html`` are never published: a history may come from anyone, and
  their HTML (a ``<script>``) would run on the site's origin. Other runs are listed without a link;
* ``site.json`` — what the pages show, for scripts.

Every file is written through :mod:`harness.core.safefs` (never through a symlink the output or a
history holds), and every text of the feed through :func:`harness.core.escape.xml` (no character
XML 1.0 forbids, so feed readers keep the feed).

Input is the model of :func:`harness.regression.timeline.collect` (groups of runs with their trends);
this module only draws and writes. Charts are matplotlib SVG through :mod:`reports.plots`.
"""

from __future__ import annotations

import html
import json
import re
import statistics
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from harness.core import safefs  # noqa: E402
from harness.core import units as fmt  # noqa: E402
from harness.core.errors import UserError  # noqa: E402
from harness.core.escape import terminal  # noqa: E402
from harness.core.escape import xml as xml_text  # noqa: E402
from harness.engine import store  # noqa: E402
from reports.plots import to_svg  # noqa: E402
from reports.templating import environment  # noqa: E402

ATOM = "http://www.w3.org/2005/Atom"
SUMMARY = "site.json"
#: Files of the site this module writes (a directory holding other things is not overwritten).
MANAGED = ("index.html", "regressions.html", "feed.xml", SUMMARY, "runs")
UP, DOWN, BASE = "#d93025", "#1f9d55", "#8a6d00"


class SiteError(UserError):
    """The site cannot be written where asked (one line)."""


def safe_name(text: str) -> str:
    """A file-name and anchor-safe form of a suite, run or case id."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text)) or "_"


def suite_page(suite: str) -> str:
    return f"suite-{safe_name(suite)}.html"


def _when(iso) -> str:
    """'2026-11-25 17:01Z' from an ISO time (as written by the harness, UTC)."""
    text = str(iso or "")
    return text[:16].replace("T", " ") + ("Z" if text.endswith("+00:00") else "") if text else ""


def _env():
    return environment({"pct": fmt.change, "when": _when, "safe_name": safe_name}, {"suite_page": suite_page})


# ----------------------------------------------------------------------------------------------
# charts


def add_titles(svg: str, gid: str, titles: list[str]) -> str:
    """Give the elements of the artist drawn with ``gid`` hover text: one ``<title>`` per marker
    (``<use>``) when there are as many as ``titles``, else one for the whole group."""
    start = svg.find(f'<g id="{gid}">')
    if start < 0:
        return svg
    body = start + len(f'<g id="{gid}">')
    uses = [m for m in re.finditer(r"<use [^>]*?/>", svg[body:])][: len(titles)]
    if len(titles) > 1 and len(uses) == len(titles):
        out, pos = [svg[:body]], body
        for m, text in zip(uses, titles):
            out.append(svg[pos:body + m.end() - 2])
            out.append(f"><title>{html.escape(text)}</title></use>")
            pos = body + m.end()
        out.append(svg[pos:])
        return "".join(out)
    return svg[:body] + f"<title>{html.escape(' · '.join(titles))}</title>" + svg[body:]


def _position(runs, iso: str) -> int | None:
    """Index of the first run started at or after ``iso`` (None when none is)."""
    for i, r in enumerate(runs):
        if str(r.started) >= iso:
            return i
    return None


def trend_chart(trend: dict[str, Any], runs, baselines, chart_id: str) -> str:
    """One case across ``runs``: median per run with its interval, segment levels, change points and
    baseline promotions; hover text on every point and marker line."""
    pts = trend["points"]
    x = [p["run_index"] for p in pts]
    y = [p["time_ms"] for p in pts]
    fig, ax = plt.subplots(figsize=(10.5, 2.5))
    lo = [max(p["time_ms"] - p["low"], 0) if fmt.finite(p["low"]) else 0 for p in pts]
    hi = [max(p["high"] - p["time_ms"], 0) if fmt.finite(p["high"]) else 0 for p in pts]
    ax.errorbar(x, y, yerr=[lo, hi], fmt="none", ecolor="#9db4e8", elinewidth=2.2, zorder=1,
                label="interval (95% CI of the median, else p10–p90)")
    ax.plot(x, y, lw=1, color="#2754c5", alpha=0.6, zorder=2)
    ax.plot(x, y, ls="none", marker="o", ms=4.5, color="#2754c5", zorder=3, gid=f"{chart_id}-pts", label="median time")
    titles = {f"{chart_id}-pts": [
        f"{p['run_id']}\n{_when(p['started'])} · commit {p['commit'] or 'unknown'}\n"
        f"median {fmt.duration_ms(p['time_ms'])}"
        f" ({p['interval']} {fmt.duration_ms(p['low'])} – {fmt.duration_ms(p['high'])})" for p in pts]}
    bounds = [0] + [s["index"] for s in trend["steps"]] + [len(pts)]
    for a, b in zip(bounds, bounds[1:]):
        ax.hlines(statistics.median(y[a:b]), x[a] - 0.35, x[b - 1] + 0.35, colors="#1d2330", lw=1, alpha=0.55, zorder=2)
    for i, s in enumerate(trend["steps"]):
        at, color = pts[s["index"]]["run_index"] - 0.5, UP if s["ratio"] > 1 else DOWN
        gid = f"{chart_id}-step{i}"
        ax.axvline(at, color=color, lw=1.4, ls="--", gid=gid)
        text = f"{fmt.change(s['ratio'])} at {s['commit'] or s['run_id']}"
        ax.annotate(text, (at, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -2), textcoords="offset points",
                    fontsize=7.5, color=color, va="top", fontweight="bold")
        titles[gid] = [f"{text}: {fmt.duration_ms(s['before'])} → {fmt.duration_ms(s['after'])} "
                       f"(first run at the new level: {s['run_id']})"]
    ids = {r.run_id: i for i, r in enumerate(runs)}
    for j, event in enumerate(baselines):
        at = ids.get(event.run_id)
        if at is not None and at in x:
            gid = f"{chart_id}-base{j}"
            ax.plot([at], [y[x.index(at)]], ls="none", marker="D", ms=9, mfc="none", mec=BASE, mew=1.3, zorder=4,
                    gid=gid)
            titles[gid] = [f"run {event.run_id} became the baseline ({_when(event.promoted)})"]
        since = _position(runs, event.promoted)
        if since is not None and since > 0:
            gid = f"{chart_id}-promo{j}"
            ax.axvline(since - 0.5, color=BASE, lw=1, ls=":", gid=gid)
            titles[gid] = [f"baseline → {event.run_id} (promoted {_when(event.promoted)})"]
    ax.set_xlim(-0.5, max(len(runs) - 0.5, 0.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=14))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda v, _p: _when(runs[int(v)].started)[5:10] if 0 <= int(v) < len(runs) and v == int(v) else ""))
    ax.set_xlabel("run (date, oldest → newest)")
    ax.set_ylabel("median time (ms)")
    # the data's range, but at least ±10% around the median: a 5% step shows, 1% noise looks small
    middle = statistics.median(y)
    top = max([p["time_ms"] + h for p, h in zip(pts, hi)] + [middle * 1.1])
    bottom = min([p["time_ms"] - d for p, d in zip(pts, lo)] + [middle * 0.9])
    pad = (top - bottom) * 0.08
    ax.set_ylim(max(bottom - pad, 0), top + 2 * pad)
    ax.set_title(trend["label"], loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=2, borderaxespad=0.2)
    fig.tight_layout()
    svg = to_svg(fig, f"median time per run: {trend['label']}")
    for gid, texts in titles.items():
        svg = add_titles(svg, gid, texts)
    return svg


# ----------------------------------------------------------------------------------------------
# the feed


def _entry_id(*parts: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "attention-bench:" + "/".join(map(str, parts))))


def atom_feed(regressions: list[dict[str, Any]], title: str, updated: str, base_url: str | None = None) -> str:
    """An Atom feed (RFC 4287) with one entry per regression; links relative unless ``base_url``."""
    base = xml_text(base_url.rstrip("/") + "/") if base_url else ""

    def text(parent, tag: str, value: Any, attrs: dict[str, str] | None = None) -> None:
        # every text and attribute without the characters XML 1.0 forbids (a run's names may hold them)
        element = ET.SubElement(parent, tag, {k: xml_text(v) for k, v in (attrs or {}).items()})
        if value is not None:
            element.text = xml_text(value)

    feed = ET.Element("feed", {"xmlns": ATOM})
    text(feed, "id", _entry_id("feed", base_url or title))
    text(feed, "title", f"{title}: regressions")
    text(feed, "updated", updated)
    text(ET.SubElement(feed, "author"), "name", "Attention Bench")
    text(feed, "link", None, {"rel": "alternate", "type": "text/html", "href": base + "regressions.html"})
    if base:
        text(feed, "link", None, {"rel": "self", "type": "application/atom+xml", "href": base + "feed.xml"})
    for r in regressions:
        entry = ET.SubElement(feed, "entry")
        text(entry, "id", _entry_id(r["suite"], r["fingerprint"], r["case_id"], r["run_id"]))
        text(entry, "title", f"{r['suite']}: {r['label']} {fmt.change(r['ratio'])} at {r['commit'] or r['run_id']}")
        text(entry, "updated", r["started"] or updated)
        href = f"{base}{suite_page(r['suite'])}#case-{safe_name(r['slug'])}-{safe_name(r['case_id'])}"
        text(entry, "link", None, {"rel": "alternate", "type": "text/html", "href": href})
        text(entry, "summary",
             f"median time {fmt.duration_ms(r['before'])} → {fmt.duration_ms(r['after'])} "
             f"({fmt.change(r['ratio'])}) on {r['hostname']} ({r['fingerprint']}), first at run {r['run_id']}, "
             f"commit {r['commit'] or 'unknown'}")
    ET.indent(feed)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(feed, encoding="unicode") + "\n"


# ----------------------------------------------------------------------------------------------
# the pages


def _prepare(out: Path) -> None:
    """An empty ``out``, or a site this module built before (its files are replaced; a symlink among
    them is removed as a link, never followed)."""
    if out.exists() and not out.is_dir():
        raise SiteError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / SUMMARY).is_file() or (out / SUMMARY).is_symlink():
            raise SiteError(f"{out}: not empty and not a site built by bench site (no {SUMMARY}); choose another -o")
        for child in out.iterdir():
            if child.name in MANAGED or child.name.startswith("suite-"):
                safefs.remove(child)
    out.mkdir(parents=True, exist_ok=True)


def _stderr(message: str) -> None:
    print(terminal(message), file=sys.stderr)


def _run_reports(groups, out: Path, log: Callable[[str], None] = _stderr) -> dict[str, dict[str, str]]:
    """The report of each group's latest run, regenerated from its data into ``runs/<run_id>/report.html``
    (never a run directory's own HTML, which may come from anyone); their site paths by run id. A run
    whose report cannot be drawn gets no link, and a warning."""
    from reports.render import render_report

    links: dict[str, dict[str, str]] = {}
    for g in groups:
        run = g.latest
        if run.run_id in links:
            continue
        dest = out / "runs" / safe_name(run.run_id) / store.REPORT
        try:
            safefs.makedirs(dest.parent, out)
            render_report(run.path, dest)
        except Exception as exc:  # noqa: BLE001 - one run's report must not stop the site
            log(f"warning: no report for run {run.run_id} on the site ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        links[run.run_id] = {"report": dest.relative_to(out).as_posix()}
    return links


def _write(out: Path, name: str, text: str) -> None:
    """A page of the site, atomically and never through a symlink (:mod:`harness.core.safefs`)."""
    safefs.write_text(out / name, text, root=out)


def _group_view(g, links: dict, with_charts: bool) -> dict[str, Any]:
    latest = g.latest
    view = {
        "g": g, "slug": safe_name(g.slug), "latest": latest, "state": g.state,
        "counts": g.counts.get(latest.run_id, {}), "links": links.get(latest.run_id, {}),
        "regressions": g.regressions(), "steps": g.recent_steps(), "failing": g.failing(),
        "baseline": g.baselines[-1] if g.baselines else None,
        "runs": [{"info": r, "counts": g.counts.get(r.run_id, {}), "links": links.get(r.run_id, {}),
                  "baseline": [e for e in g.baselines if e.run_id == r.run_id]} for r in reversed(g.runs)],
    }
    if with_charts:
        view["charts"] = [{"trend": t, "anchor": f"case-{safe_name(g.slug)}-{safe_name(t['case_id'])}",
                           "svg": trend_chart(t, g.runs, g.baselines, f"{safe_name(g.slug)}-{i}")}
                          for i, t in enumerate(g.trends)]
    return view


def _all_regressions(groups, steps: bool = False) -> list[dict[str, Any]]:
    out = []
    for g in groups:
        for s in (g.recent_steps() if steps else g.regressions()):
            out.append(dict(s, suite=g.suite, fingerprint=g.fingerprint, hostname=g.hostname, slug=g.slug))
    out.sort(key=lambda s: str(s["started"] or ""), reverse=True)  # newest first,
    return sorted(out, key=lambda s: s["ratio"] <= 1)  # slower before faster


def build_site(groups, out: str | Path, *, title: str = "Attention Bench results", base_url: str | None = None,
               recent: int = 30, min_step: float = 0.05, log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Write the site for ``groups`` (:func:`harness.regression.timeline.collect`) into ``out``;
    returns the summary also written to ``site.json``."""
    out = Path(out)
    _prepare(out)
    env = _env()
    runs = [r for g in groups for r in g.runs]
    links = _run_reports(groups, out, log)
    newest = max((str(r.finished or r.started) for r in runs), default="1970-01-01T00:00:00+00:00")
    regressions = _all_regressions(groups)
    common = {"title": title, "recent": recent, "min_step": min_step, "newest": newest,
              "suites": sorted({g.suite for g in groups}), "n_runs": len(runs)}
    views = [_group_view(g, links, with_charts=False) for g in groups]
    _write(out, "index.html", env.get_template("site_index.html.j2").render(
        **common, groups=views, regressions=regressions, machines=len({g.fingerprint for g in groups})))
    for suite in common["suites"]:
        sections = [_group_view(g, links, with_charts=True) for g in groups if g.suite == suite]
        _write(out, suite_page(suite), env.get_template("site_suite.html.j2").render(
            **common, suite=suite, sections=sections))
    changes = _all_regressions(groups, steps=True)
    _write(out, "regressions.html", env.get_template("site_regressions.html.j2").render(**common, steps=changes))
    _write(out, "feed.xml", atom_feed(regressions, title, newest, base_url))
    summary = {
        "title": title, "runs": len(runs), "recent": recent, "min_step": min_step, "updated": newest,
        "groups": [{"suite": g.suite, "fingerprint": g.fingerprint, "hostname": g.hostname, "state": g.state,
                    "runs": [r.run_id for r in g.runs], "latest": g.latest.run_id, "cases": len(g.trends),
                    "steps": [{"case_id": t["case_id"], "label": t["label"],
                               **{k: s[k] for k in ("run_id", "commit", "before", "after", "ratio")}}
                              for t in g.trends for s in t["steps"]],
                    "baselines": [e.__dict__ for e in g.baselines]} for g in groups],
        "regressions": len(regressions),
    }
    _write(out, SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    return summary
