"""The benchmark scripts' modules (bench/ is not a package) for tests that reuse their parts:
`bench_module("speech")` is bench/speech.py, loaded once."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    key = f"bench_{name}"
    if key not in sys.modules:
        if str(BENCH) not in sys.path:  # the scripts import each other by name
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]
