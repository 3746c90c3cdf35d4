"""`kimi-label stack up|down|status` (the embedded local stack) and `kimi-label demo`.

`up` and `status` print each service's state, URLs (the S3 endpoint, Prefect's API and UI,
Ray's GCS and dashboard) and log, then the `export` lines a client needs (never the secret
key); with `--json`, only the status as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipelines.errors import StackError

DEFAULT_HOME = Path(os.environ.get("KIMI_LABEL_HOME", "~/.kimi-label/stack")).expanduser()
URL_NAMES = {"s3": "S3", "api": "API", "ui": "UI", "gcs": "GCS", "dashboard": "dashboard"}


def add_commands(commands) -> None:
    from flows.console import demo

    p = commands.add_parser("stack", help="up | down | status of the embedded local stack "
                                          "(SeaweedFS, Prefect server, Ray head) on 127.0.0.1")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", default=str(DEFAULT_HOME), help="data folder of the stack "
                                                             "(default: %(default)s)")
    p.add_argument("--prefect", action="store_true", help="also a Prefect server (and its UI)")
    p.add_argument("--ray", action="store_true", help="also a Ray head node (and its dashboard "
                                                      "and Jobs API)")
    p.add_argument("--ray-cpus", type=_positive, default=None,
                   help="CPUs the Ray head offers (default: this machine's)")
    p.add_argument("--s3-port", type=int, default=None,
                   help="port of the S3 endpoint (default: the last one, when free, else a "
                        "free one)")
    p.add_argument("--json", action="store_true",
                   help="print only the status, as JSON (up, status)")
    p.set_defaults(run=stack)
    p = commands.add_parser("demo", help="the main job end to end on embedded defaults (tiny "
                                         "checkpoint, sample audio, the local stack)",
                            description=demo.__doc__)
    demo.add_arguments(p)
    p.set_defaults(run=demo.run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of CPUs")
    return value


def stack(args: argparse.Namespace) -> int:
    from pipelines import local_stack

    home = Path(args.home).expanduser()
    try:
        if args.action == "up":
            local_stack.stack_up(home, prefect=args.prefect, ray=args.ray, s3_port=args.s3_port,
                                 ray_cpus=args.ray_cpus)
        elif args.action == "down":
            stopped = local_stack.stack_down(home)
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
            return 0
    except StackError as exc:
        raise StackError(f"stack {args.action}: {exc}") from None
    status = local_stack.stack_status(home)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    state = local_stack.StackState.load(home)
    if state is not None and state.services:
        print(f"# environment for clients; the secret key is s3.secret_key in "
              f"{home}/credentials.json:")
        for name in sorted(state.env()):
            if "SECRET" not in name:
                print(f"export {name}={state.env()[name]}")
    return 0


def format_status(status: dict) -> str:
    """One block per service: its state, URLs, CPUs, PIDs and log."""
    lines = [f"stack in {status['home']}: {'up' if status['up'] else 'not up'}"]
    for name, svc in status["services"].items():
        if not svc["running"] and not svc.get("log"):
            lines.append(f"{name:8} not started")
            continue
        state = ("healthy" if svc["healthy"] else "unhealthy") if svc["running"] else "stopped"
        lines.append(f"{name:8} {state}" + (f" ({svc['detail']})" if not svc["healthy"]
                                            and svc.get("detail") else ""))
        for key, url in svc["urls"].items():
            lines.append(f"  {URL_NAMES.get(key, key):10} {url}")
        if svc.get("num_cpus"):
            lines.append(f"  {'CPUs':10} {svc['num_cpus']}")
        if svc.get("auth_token_file"):
            lines.append(f"  {'token':10} {svc['auth_token_file']} (the dashboard asks for it)")
        lines.append(f"  {'PIDs':10} {' '.join(map(str, svc['pids'])) or '-'}")
        lines.append(f"  {'log':10} {svc['log']}")
    return "\n".join(lines)
