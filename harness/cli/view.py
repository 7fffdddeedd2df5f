"""`harness view`: a local web viewer over run folders (overview, taxonomy map, questions, item card)."""

from __future__ import annotations

import sys
import time


def add_cli(sub) -> None:
    v = sub.add_parser("view", help="a local web viewer over run folders (any run kind)")
    v.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (results*.jsonl, run.json)")
    v.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    v.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, loopback only; another address exposes the "
                        "results and images to that network)")
    v.add_argument("--image-root", action="append", default=[], metavar="DIR",
                   help="also serve images under DIR (default: the runs' --image-root-map targets, else the "
                        "folder of the items file)")
    v.add_argument("--rebuild", action="store_true", help="rebuild the index of every run folder")
    v.set_defaults(func=cmd_view)


def cmd_view(args) -> int:
    from harness.view.server import ServerThread, Viewer, _is_loopback

    t0 = time.perf_counter()
    print(f"indexing {len(args.runs)} run folder(s) ...", file=sys.stderr, flush=True)
    viewer = Viewer(args.runs, image_roots=args.image_root, rebuild=args.rebuild,
                    loopback_only=_is_loopback(args.host))
    print(f"ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if not _is_loopback(args.host):
        print(f"harness view: warning: listening on {args.host}: anyone who can reach it sees these results",
              file=sys.stderr)
    server = ServerThread(viewer, args.host, args.port).start()
    print(f"harness view: {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
