#!/usr/bin/env python3
"""Compare psycopg test-suite runs across endpoints (for scripts/psycopg-suite.sh).

Reads RESULTS/<endpoint>.xml (pytest junit xml, junit_family=xunit1) for each
endpoint named on the command line, the first being the reference ("direct").
Prints, and writes to RESULTS/<endpoint>.txt:

  * passed / failed / error / skipped (xfail counted as skipped) per endpoint,
    per unique test id (a test failing in its call and erroring in teardown
    counts once, as failed);
  * for each other endpoint, the tests that fail or error there but pass
    directly, grouped by an apparent cause guessed from the failure message
    (a heuristic: read the message), with what the other endpoints did;
  * the tests that ran directly but not at all there (an interrupted run).

Usage: psycopg_suite_compare.py --results DIR [--header FILE] direct EP...
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

OUTCOMES = ("passed", "failed", "error", "skipped")

# (cause, regex on "test id + message"), first match wins. Heuristic labels
# for grouping; the message printed next to each test is what counts.
CAUSES: list[tuple[str, str]] = [
    ("timing assertion (load-sensitive; check it by rerunning)",
     r"comparison failed Obtained: |test_notify_query_notify|assert [0-9.]+ < \(?[0-9.]+|test_wait_r\[|test_queue_timeout"),
    ("pg_prepared_statements shows the pooler's per-server-connection statements, not the client's",
     r"pg_prepared_statements|Row\(name='(pgmux_|_pg3_)|test_prepared(_async)?\.py::test_(auto_prepare|do_prepare|dont_prepare|"
     r"different_types|params_types|untyped_json|evict_lru|misc_statement|no_prepare_multi|prepare_disable)|"
     r"test_pipeline(_async)?\.py::test_auto_prepare"),
    ("server-side prepared statement reused after the objects it refers to changed",
     r"cache lookup failed|cached plan must not change result type|prepared statement .* (does not|already) exist"),
    ("notification pid (Notify.pid is the server's pid, the client saw the proxy's backend key)",
     r"(PG)?[Nn]otify\(.*pid=|be_pid"),
    ("LISTEN/NOTIFY across transactions / connections", r"test_notif|[Nn]otif|LISTEN"),
    ("backend pid (pg_terminate_backend / pg_stat_activity on info.backend_pid: the proxy's key, not a server pid)",
     r"backend_pid|pg_backend_pid|test_(broken|identify_closure|concurrent_close|context_inerror_rollback_no_clobber|"
     r"connect_check|getconn_check|check_connection|connect_no_check|stats_check|"
     r"right_exception_on_server_disconnect)\b"),
    ("server connection terminated under the client: the client is kept open (transaction pooling) instead of closed",
     r"test_reset(_async)?\b|ConnStatus\.BAD"),
    ("FATAL from the server re-reported with another SQLSTATE", r"FATAL [0-9A-Z]{5}|ConnectionFailure|AdminShutdown"),
    ("server backend outlives its client (the pooler keeps the server connection)",
     r"test_ctrl_c\b|process didn't stop"),
    ("cancel request (cancel() of a running query)", r"cancel"),
    ("login as a user / database the proxy is not configured for", r"role \".*\" does not exist|database \".*\" does not exist|test_change_password"),
    ("parameter status spelling (client_encoding etc. echoed as the client sent it)",
     r"test_encoding_env_var|parameter_status|ParameterStatus|client_encoding"),
    ("pool wait timeout (all server connections taken)", r"query_wait_timeout|no server connection"),
    ("test timed out (pytest-timeout)", r"Timeout >|Failed: Timeout"),
    ("two-phase commit (prepared transactions)", r"test_tpc|tpc_|prepared transaction|pg_prepared_xacts"),
    ("session state across transactions (SET, temp tables, advisory locks, server cursors, WITH HOLD)",
     r"SET |set_config|temp(orary)? table|WITH HOLD|withhold|advisory|server[_ ]cursor|test_cursor_server|DISCARD"),
    ("COPY", r"test_copy|COPY"),
    ("connection errors", r"OperationalError|server closed the connection|connection (is )?(lost|closed|bad)|terminat"),
]


def test_id(case: ET.Element) -> str:
    name = case.get("name", "?")
    cls = case.get("classname", "")
    f = case.get("file")
    if f:
        mod = f[:-3].replace("/", ".") if f.endswith(".py") else f
        rest = cls[len(mod) + 1 :] if cls.startswith(mod) else ""
        return "::".join(p for p in (f, rest.replace(".", "::"), name) if p)
    return f"{cls}::{name}"


def load(path: Path) -> dict[str, tuple[str, str]] | None:
    """Map test id -> (outcome, one-line message); None if no xml."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as ex:
        print(f"warning: cannot parse {path}: {ex}", file=sys.stderr)
        return None
    rank = {"passed": 0, "skipped": 1, "error": 2, "failed": 3}
    res: dict[str, tuple[str, str]] = {}
    for case in root.iter("testcase"):
        tid = test_id(case)
        outcome, msg = "passed", ""
        for child in case:
            tag = child.tag
            if tag in ("failure", "error", "skipped"):
                o = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                if rank[o] > rank[outcome]:
                    outcome = o
                    msg = child.get("message") or (child.text or "")
        msg = " ".join(msg.split())[:220]
        prev = res.get(tid)
        if prev is None or rank[outcome] > rank[prev[0]]:
            res[tid] = (outcome, msg)
    return res


def cause_of(tid: str, msg: str) -> str:
    text = f"{tid} {msg}"
    for label, rx in CAUSES:
        if re.search(rx, text):
            return label
    return "other (read the message)"


def counts(res: dict[str, tuple[str, str]]) -> Counter:
    c = Counter(o for o, _ in res.values())
    return c


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--header", type=Path)
    ap.add_argument("endpoints", nargs="+")
    a = ap.parse_args()

    runs = {ep: load(a.results / f"{ep}.xml") for ep in a.endpoints}
    status = {}
    for ep in a.endpoints:
        p = a.results / f"{ep}.status"
        status[ep] = p.read_text().strip().replace("\n", "; ") if p.exists() else ""

    out: list[str] = []
    if a.header and a.header.exists():
        out += a.header.read_text().rstrip("\n").split("\n")
        out.append("")

    out.append(f"{'endpoint':<24} {'passed':>7} {'failed':>7} {'error':>7} {'skipped':>8} {'total':>7}  run")
    out.append(f"{'-' * 24} {'-' * 7} {'-' * 7} {'-' * 7} {'-' * 8} {'-' * 7}  ---")
    for ep in a.endpoints:
        r = runs[ep]
        if r is None:
            out.append(f"{ep:<24} {'no results (see ' + ep + '.log)':>40}  {status[ep]}")
            continue
        c = counts(r)
        out.append(
            f"{ep:<24} {c['passed']:>7} {c['failed']:>7} {c['error']:>7} {c['skipped']:>8} {len(r):>7}  {status[ep]}"
        )
    out.append("(per unique test id; xfail/xpass-non-strict count as skipped/passed as pytest's junit xml reports them)")

    ref_name = a.endpoints[0]
    ref = runs[ref_name]
    per_ep_lines: dict[str, list[str]] = {}
    for ep in a.endpoints:
        r = runs[ep]
        lines: list[str] = []
        if r is None:
            per_ep_lines[ep] = [f"{ep}: no results"]
            continue
        c = counts(r)
        lines.append(
            f"{ep}: passed {c['passed']}, failed {c['failed']}, error {c['error']}, skipped {c['skipped']}, total {len(r)}  {status[ep]}"
        )
        if ep != ref_name and ref is not None:
            regress = sorted(t for t, (o, _) in r.items() if o in ("failed", "error") and ref.get(t, ("",))[0] == "passed")
            fixed = sorted(t for t, (o, _) in r.items() if o == "passed" and ref.get(t, ("",))[0] in ("failed", "error"))
            missing = sorted(t for t in ref if t not in r)
            head = f"{ep}: {len(regress)} tests fail/error here but pass {ref_name}"
            out.append("")
            out.append("=" * len(head))
            out.append(head)
            out.append("=" * len(head))
            lines.append("")
            lines.append(head + ":")
            groups: dict[str, list[str]] = defaultdict(list)
            for t in regress:
                groups[cause_of(t, r[t][1])].append(t)
            for label in sorted(groups, key=lambda k: (-len(groups[k]), k)):
                out.append(f"-- {label} ({len(groups[label])})")
                lines.append(f"-- {label} ({len(groups[label])})")
                for t in groups[label]:
                    o, msg = r[t]
                    others = []
                    for other in a.endpoints[1:]:
                        if other == ep or runs[other] is None:
                            continue
                        oo = runs[other].get(t, ("not run",))[0]
                        others.append(f"{other}={oo}")
                    line = f"   {o.upper():<6} {t}"
                    detail = f"          {msg}" if msg else ""
                    also = f"          [{', '.join(others)}]" if others else ""
                    out.append(line)
                    lines.append(line)
                    for extra in (detail, also):
                        if extra:
                            out.append(extra)
                            lines.append(extra)
            if fixed:
                lines.append("")
                lines.append(f"{ep}: {len(fixed)} tests pass here but fail/error {ref_name}:")
                lines += [f"   {t}" for t in fixed]
                out.append(f"({len(fixed)} tests pass through {ep} but fail/error {ref_name}: see {ep}.txt)")
            if missing:
                lines.append("")
                lines.append(f"{ep}: {len(missing)} tests ran {ref_name} but not here (interrupted run?):")
                lines += [f"   {t}" for t in missing[:500]]
                out.append(f"({len(missing)} tests ran {ref_name} but not through {ep}: see {ep}.txt)")
        # Everything that did not pass here, for reference.
        bad = sorted(t for t, (o, _) in r.items() if o in ("failed", "error"))
        lines.append("")
        lines.append(f"{ep}: all {len(bad)} failed/error tests:")
        for t in bad:
            lines.append(f"   {r[t][0].upper():<6} {t}")
            if r[t][1]:
                lines.append(f"          {r[t][1]}")
        per_ep_lines[ep] = lines

    for ep, lines in per_ep_lines.items():
        (a.results / f"{ep}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
