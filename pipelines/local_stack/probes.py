"""Whether a service answers: a TCP connect, an HTTP health check, a signed S3 request.

Every probe returns quickly (timeouts of a few seconds, no retries) and reports a failure as
its reason, never as an exception: a probe that fails means "not healthy (yet)".
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether `host:port` accepts a TCP connection."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def probe_http(url: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(answered 200, what it answered or why not)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read(200).decode(errors="replace").strip()
            return resp.status == 200, f"HTTP {resp.status} {body}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def s3_client(endpoint_url: str, region: str, access_key: str, secret_key: str,
              connect_timeout_s: float = 2.0):
    """A botocore S3 client for one try per call (no retries), path-style as SeaweedFS wants;
    close() it after use."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(connect_timeout=connect_timeout_s, read_timeout=5,
                      retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
    )


def probe_s3_bucket(endpoint_url: str, region: str, access_key: str, secret_key: str,
                    bucket: str) -> tuple[bool, str]:
    """(a signed HEAD of the bucket succeeded, what happened)."""
    client = s3_client(endpoint_url, region, access_key, secret_key)
    try:
        client.head_bucket(Bucket=bucket)
        return True, f"signed HEAD s3://{bucket} ok"
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with its reason
        return False, f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
