"""Issue 20's soak, short: `loadtest/soak.py` (its own server process, the tiny model with a chat
template, 4 tenants) for 45 s of mixed traffic from threads: generation and chat through both
doors, classification, uploads, hot swaps and deletes, client cancels, short deadlines and hostile
requests. It must pass every check: no server error, no call answered outside what it may, no
acknowledged upload lost, the running/waiting gauges back to 0 on the real /metrics, health
SERVING, no ERROR or traceback in the server log. RSS is reported, not asserted (a 45 s run measures warm-up more than leaks)."""
from __future__ import annotations

import json

from loadtest import soak

SECONDS = 45
EVERY_CALL = ("Generate", "GenerateStream", "Generate (chat)", "GenerateStream (chat)", "Classify", "Completions",
              "CompletionsStream", "ChatCompletions", "ChatCompletionsStream", "UploadAdapter", "DeleteAdapter",
              "GenerateStream (cancelled)", "CompletionsStream (closed)", "Generate (short deadline)")


def test_soak_passes_every_check(tmp_path):
    out = tmp_path / "report.json"
    rc = soak.main(["--seconds", str(SECONDS), "--reports", str(tmp_path), "--json", str(out), "--threads", "6"])
    assert out.exists(), f"the soak broke (exit {rc}) before writing a report; see {tmp_path}"
    report = json.loads(out.read_text())
    text = (tmp_path / next(p.name for p in tmp_path.glob("soak-*_report.txt"))).read_text()
    assert report["checks"] == {"server errors": True, "unexpected statuses": True, "uploads lost": True,
                                "gauges drained": True, "health": True, "server log clean": True}, text
    assert rc == 0 and report["ok"], text
    # the soak did what it says: every kind of call ran, and hostile requests were refused as such
    calls = report["calls"]
    for name in EVERY_CALL:
        assert sum(calls.get(name, {}).values()) > 0, f"no {name} call in the soak:\n{text}"
    hostile = [statuses for name, statuses in calls.items() if "(" in name and name.split(" (")[1][:-1] not in
               ("chat", "cancelled", "closed", "short deadline")]
    assert hostile and all(set(s) <= soak.CLIENT_ERRORS for s in hostile), text
    assert report["uploads_checked"] >= 8          # a0 and hot of each of the 4 tenants at least
    assert report["rss_after_mib"] > 0
