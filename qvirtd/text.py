"""How results read for people (qvirsh without --json): tables, key/value lists, events."""

from __future__ import annotations

import json
from typing import Any


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[("-" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = [" " + "   ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True))]
    lines.append("-" * (sum(widths) + 3 * (len(widths) - 1) + 2))
    for c in cells:
        lines.append(" " + "   ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    return "\n".join(lines)


def domstats(result: dict[str, Any]) -> str:
    """One line per domain: CPU seconds, resident memory, block bytes read and written."""
    rows = []
    for d in result["domains"]:
        block = d.get("block") or []
        cpu = d.get("cpu_time_ns")
        rss = (d.get("memory") or {}).get("rss_kib")
        rows.append({
            "name": d["name"], "state": d["state"],
            "cpu": f"{cpu / 1e9:.2f}" if cpu is not None else None,
            "rss": f"{rss / 1024:.1f}" if rss is not None else None,
            "rd": sum(b.get("rd_bytes") or 0 for b in block) if "block" in d else None,
            "wr": sum(b.get("wr_bytes") or 0 for b in block) if "block" in d else None,
            "stale": d.get("stale_reason") if d.get("stale") else None})
    return table(rows, [("name", "Name"), ("state", "State"), ("cpu", "CPU s"),
                        ("rss", "RSS MiB"), ("rd", "Read B"), ("wr", "Written B"),
                        ("stale", "Stale")])


def key_values(info: dict[str, Any]) -> str:
    width = max(len(k) for k in info) + 1
    out = []
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items() if b is not None) or "-"
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v) or "-"
        out.append(f"{(k + ':').ljust(width)} {'-' if v is None else v}")
    return "\n".join(out)


def event_line(ev: dict[str, Any]) -> str:
    dom = ev.get("domain", {})
    what = ev.get("event", "?")
    if ev.get("type"):
        what += f" {ev['type']}"
        if ev.get("detail"):
            what += f"/{ev['detail']}"
    extra = f" {json.dumps(ev['data'])}" if ev.get("data") else ""
    return f"{ev.get('time', '')} #{ev.get('seq')} domain '{dom.get('name')}': {what}{extra}"


def job_info(r: dict[str, Any]) -> str:
    lines = []
    for slot, label in (("async_job", "Async job"), ("job", "Job")):
        job = r.get(slot)
        if job is None:
            lines.append(f"{label + ':':12} none")
            continue
        lines.append(f"{label + ':':12} {job['kind']}" + (f" (phase {job['phase']})"
                                                         if job.get("phase") else ""))
        lines.append(f"{'Owner:':12} {job['owner']}")
        lines.append(f"{'Elapsed:':12} {job['elapsed_s']:.1f} s (since {job['started']})")
        if job.get("allowed"):
            lines.append(f"{'Allows:':12} {', '.join(job['allowed'])}")
        if job.get("progress"):
            lines.append(f"{'Progress:':12} {json.dumps(job['progress'])}")
        if job.get("abort_requested"):
            lines.append(f"{'Aborting:':12} asked by {job['abort_requested']}")
    return "\n".join(lines)


def compact_json(obj: Any) -> str:
    return json.dumps(obj)


def pretty_json(obj: Any) -> str:
    return json.dumps(obj, indent=2)
