"""Dependencies point one way: kimi_ops -> pipelines -> flows."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"kimi_ops": ("ray", "prefect", "pipelines", "flows"), "pipelines": ("prefect", "flows")}


def test_packages_import_only_downstream():
    offenders = []
    for package, banned in FORBIDDEN.items():
        pattern = re.compile(rf"^\s*(import|from)\s+({'|'.join(banned)})\b", re.MULTILINE)
        for path in (ROOT / package).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
