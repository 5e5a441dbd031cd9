#!/usr/bin/env python3
"""Judges an Autobahn|Testsuite fuzzingclient run against Chorus at the protocol level.

Chorus is not an echo server: it greets every connection with a `hello` frame and answers
each complete text message with a JSON frame (an `error` for text that is not a Chorus
frame, `unsupported_frame` for binary). Autobahn scores every case FAILED for that, so this
script judges what the RFC decides instead:

- `hello` is left out of what the server sent.
- A case that expects an echo passes when the server answered every complete message it
  was sent (one JSON answer per expected echo), sent every expected pong, and closed
  correctly. Where the fuzzer itself gave up waiting for the echo and closed with 1001,
  the close code it reports as wrong is its own.
- Any other case passes when the server sent nothing but the expected pongs and closed
  with an expected code (fail-fast cases: 1002, 1007).
- Messages over `ws_frame_bytes_max` (8 MiB by default) are closed with 1009 by design.

Usage: judge.py REPORTS_DIR [AGENT]
"""
import collections
import json
import sys


def is_hello(e):
    return e[0] == "message" and '"heartbeat_interval"' in e[1]


def is_answer(e):
    return e[0] == "message" and e[1].startswith('{"code"')


def judge(reports, agent):
    index = json.load(open(f"{reports}/index.json"))[agent]
    verdicts = collections.Counter()
    failures = []
    for case in sorted(index, key=lambda c: [int(x) for x in c.split(".")]):
        d = json.load(open(f"{reports}/{agent}_case_{case.replace('.', '_')}.json"))
        sent = [e for e in d["received"] if not is_hello(e)]
        expected = d["expected"]
        echoes = max((sum(1 for e in v if e[0] == "message") for v in expected.values()), default=0)
        pongs_wanted = max((sum(1 for e in v if e[0] == "pong") for v in expected.values()), default=0)
        pongs = sum(1 for e in sent if e[0] == "pong")
        # Performance cases record no events, only a sentence about the echo they got.
        answers = sum(1 for e in sent if is_answer(e)) + (1 if "but got" in d["result"] or "Echo'ed" in d["result"] else 0)
        remote = d.get("remoteCloseCode")
        fuzzer_went_away = d.get("localCloseCode") == 1001
        over_limit = remote == 1009 and "16 * 2**20" in d["description"]
        close_ok = d["behaviorClose"] in ("OK", "INFORMATIONAL") or fuzzer_went_away or over_limit
        if d["behavior"] == "INFORMATIONAL":
            verdict = "informational"
        elif echoes or answers:
            ok = answers >= max(echoes, 1) and pongs >= pongs_wanted and close_ok
            verdict = "answered" if ok else "FAILED"
        else:
            only_pongs = all(e[0] in ("pong", "timeout") for e in sent) and pongs >= pongs_wanted
            verdict = "protocol ok" if only_pongs and close_ok else "FAILED"
        verdicts[verdict] += 1
        if verdict == "FAILED":
            failures.append((case, d["description"][:80], d["resultClose"][:80]))
    return len(index), verdicts, failures


if __name__ == "__main__":
    reports = sys.argv[1]
    agent = sys.argv[2] if len(sys.argv) > 2 else "chorus"
    total, verdicts, failures = judge(reports, agent)
    print(f"{total} cases: " + ", ".join(f"{v} {n}" for v, n in sorted(verdicts.items())))
    for f in failures:
        print("FAILED", *f)
    sys.exit(1 if failures else 0)
