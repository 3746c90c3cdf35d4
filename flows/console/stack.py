"""`kimi-label stack up|down|status` (the embedded local stack) and `kimi-label demo`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipelines.errors import StackError

DEFAULT_HOME = Path(os.environ.get("KIMI_LABEL_HOME", "~/.kimi-label/stack")).expanduser()


def add_commands(commands) -> None:
    from flows.console import demo

    p = commands.add_parser("stack", help="up | down | status of the embedded local stack "
                                          "(SeaweedFS, Prefect server, Ray head) on 127.0.0.1")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", default=str(DEFAULT_HOME), help="data folder of the stack "
                                                             "(default: %(default)s)")
    p.add_argument("--prefect", action="store_true", help="also a Prefect server")
    p.add_argument("--ray", action="store_true", help="also a Ray head node")
    p.add_argument("--s3-port", type=int, default=None,
                   help="port of the S3 endpoint (default: the last one, when free, else a "
                        "free one)")
    p.set_defaults(run=stack)
    p = commands.add_parser("demo", help="the main job end to end on embedded defaults (tiny "
                                         "checkpoint, sample audio, the local stack)",
                            description=demo.__doc__)
    demo.add_arguments(p)
    p.set_defaults(run=demo.run)


def stack(args: argparse.Namespace) -> int:
    from pipelines import local_stack

    home = Path(args.home).expanduser()
    try:
        if args.action == "up":
            local_stack.stack_up(home, prefect=args.prefect, ray=args.ray, s3_port=args.s3_port)
        elif args.action == "down":
            stopped = local_stack.stack_down(home)
            print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
            return 0
    except StackError as exc:
        raise StackError(f"stack {args.action}: {exc}") from None
    print(json.dumps(local_stack.stack_status(home), indent=2))
    state = local_stack.StackState.load(home)
    if state is not None and state.services:
        print(f"# environment for clients; the secret key is s3.secret_key in "
              f"{home}/credentials.json:")
        for name in sorted(state.env()):
            if "SECRET" not in name:
                print(f"export {name}={state.env()[name]}")
    return 0
