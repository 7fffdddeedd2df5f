"""`harness show RUN_DIR QID`: the request a run sent for one question, and what came back."""

from __future__ import annotations

import sys

import orjson

from harness.runs.show import show


def add_cli(sub) -> None:
    p = sub.add_parser("show", help="one question as the model saw it: the rebuilt request and the stored answer")
    p.add_argument("run", metavar="RUN_DIR", help="a run folder")
    p.add_argument("qid", help="the question id (the `qid` of a results.jsonl line)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_show)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    out = []
    for part in content or []:
        if part.get("type") == "text":
            out.append(part["text"])
        elif part.get("type") == "image_url":
            out.append(part["image_url"]["url"])
    return "\n".join(out)


def cmd_show(args) -> int:
    d = show(args.run, args.qid)
    if args.json:
        sys.stdout.write(orjson.dumps(d, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    p = print
    p(f"qid {d['qid']}" + (f"  image {d['image']}" if d["image"] else ""))
    for r in d["requests"]:
        if "body" not in r:
            p(f"  ({r['note']})")
            continue
        body = dict(r["body"])
        p(f"POST {r['path']}")
        for m in body.pop("messages", []):
            p(f"--- {m['role']}\n{_text(m['content'])}")
        if "prompt" in body:
            p(f"--- prompt\n{body.pop('prompt')}")
        p("--- decoding " + orjson.dumps(body).decode())
    a = d["answer"]
    if a is None:
        p("--- answer: not asked yet")
    else:
        p(f"--- answer: raw {a.get('raw')!r} -> letter {a.get('letter')} -> prediction {a.get('prediction')!r}; "
          f"truth {a.get('truth')!r}" + (f"; error {a['error']}" if a.get("error") else ""))
    return 0
