"""Where the lake's files live: a local folder or S3-compatible object storage (``s3://``).

One pyarrow filesystem (:func:`filesystem`) serves both, so the code that writes tile files,
overlays and pictures does not branch on where they go; delta-rs gets the same settings as
``storage_options`` (:func:`delta_options`). The settings come from the ``storage`` config
section (:class:`slidelake.config.StorageConfig`) or the standard AWS environment variables;
credentials only ever come from the AWS chain of each process, never from a config or a table.

Writes of whole files are atomic for readers: a local file is written beside its name and
renamed; an object store's PUT makes the object visible only when complete.
"""

from __future__ import annotations

import io
import os
import re
import uuid
from typing import Any
from urllib.parse import urlparse

from slidelake.config import StorageConfig

REMOTE_SCHEMES = ("s3://", "s3a://")
# where a storage error tells the user to look; never the values
WHERE_SETTINGS = ("credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile or role), endpoint and "
                  "region from storage.endpoint / storage.region or AWS_ENDPOINT_URL / AWS_REGION")


class StorageError(OSError):
    """Object storage refused or could not be reached (wrong credentials, no such bucket, no
    server): one line naming the URI and the reason, never a secret."""


def is_remote(path: str | None) -> bool:
    """True for an object-storage URI (``s3://``, ``s3a://``); False for a local path or
    ``file://`` URI."""
    return bool(path) and path.startswith(REMOTE_SCHEMES)  # type: ignore[union-attr]


def join(base: str, *parts: str) -> str:
    """``base/part/...``: ``/``-separated for URIs, :func:`os.path.join` for local paths."""
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def _s3_kwargs(cfg: StorageConfig | None) -> dict[str, Any]:
    cfg = cfg or StorageConfig()
    endpoint = cfg.endpoint or os.environ.get("AWS_ENDPOINT_URL")
    kw: dict[str, Any] = {}
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw.update(endpoint_override=url.netloc, scheme=url.scheme)
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    path_style = cfg.path_style if cfg.path_style is not None else bool(endpoint)
    kw["force_virtual_addressing"] = not path_style
    return kw


def filesystem(path: str, cfg: StorageConfig | None = None) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path inside it)`` for a local path, ``file://`` or ``s3://``
    URI (``bucket/key`` for S3). S3 settings from ``cfg``, else the AWS environment variables
    (``AWS_ENDPOINT_URL``, ``AWS_REGION``); credentials from the AWS chain at each request."""
    import pyarrow.fs as pafs

    if is_remote(path):
        return pafs.S3FileSystem(**_s3_kwargs(cfg)), path.split("://", 1)[1].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))


class RangedFile(io.RawIOBase):
    """An object read by ranged GETs (pyarrow's ``RandomAccessFile`` on S3), never whole:
    :meth:`read_at` fetches one byte range (a stored tile) and may be called from several
    threads; ``seek``/``readinto`` serve a header parser through an ``io.BufferedReader``.
    ``RangedFile.fetched`` counts the bytes every ranged file of this process has fetched.

    Raises:
        FileNotFoundError: no such object (when opened).
    """

    fetched = 0

    def __init__(self, uri: str, cfg: StorageConfig | None = None) -> None:
        import pyarrow.fs as pafs

        fs, key = filesystem(uri, cfg)
        if fs.get_file_info(key).type != pafs.FileType.File:
            raise FileNotFoundError(f"no such object: {uri}")
        self._f = fs.open_input_file(key)

    def read_at(self, nbytes: int, offset: int) -> bytes:
        """``nbytes`` bytes from byte ``offset`` (one ranged GET)."""
        data = self._f.read_at(nbytes, offset)
        RangedFile.fetched += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer: Any) -> int:
        data = self._f.read(len(buffer))
        RangedFile.fetched += len(data)
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def delta_uri(path: str) -> str:
    """``path`` as delta-rs and pyarrow name it: ``s3a://`` (Hadoop's S3A, for Spark) becomes
    ``s3://``; anything else is unchanged."""
    return "s3://" + path[len("s3a://"):] if path.startswith("s3a://") else path


def s3a_settings(cfg: StorageConfig | None) -> dict[str, str]:
    """Hadoop S3A settings (``fs.s3a.*``) for Spark's readers and Delta writer from ``cfg``, else
    ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` (as for pyarrow and delta-rs): endpoint, region,
    path-style access, plain HTTP to an ``http://`` endpoint; empty when nothing is set.
    Credentials come from S3A's own chain (the ``AWS_*`` variables of each JVM, a profile, an
    instance role)."""
    cfg = cfg or StorageConfig()
    endpoint = cfg.endpoint or os.environ.get("AWS_ENDPOINT_URL")
    region = cfg.region or os.environ.get("AWS_REGION")
    out: dict[str, str] = {}
    if endpoint:
        out["fs.s3a.endpoint"] = endpoint
        out["fs.s3a.connection.ssl.enabled"] = "false" if endpoint.startswith("http://") else "true"
    if region:
        out["fs.s3a.endpoint.region"] = region
    path_style = cfg.path_style if cfg.path_style is not None else bool(endpoint)
    if endpoint or cfg.path_style is not None:
        out["fs.s3a.path.style.access"] = "true" if path_style else "false"
    return out


def delta_options(cfg: StorageConfig | None = None) -> dict[str, str] | None:
    """delta-rs ``storage_options`` for ``cfg`` (endpoint, region, path style, plain HTTP to an
    ``http://`` endpoint); None where the config sets nothing (delta-rs then reads the AWS
    environment variables itself). Never holds a credential."""
    if cfg is None or not (cfg.endpoint or cfg.region or cfg.path_style is not None):
        return None
    out: dict[str, str] = {}
    if cfg.endpoint:
        out["AWS_ENDPOINT_URL"] = cfg.endpoint
        if cfg.endpoint.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    if cfg.region:
        out["AWS_REGION"] = cfg.region
    path_style = cfg.path_style if cfg.path_style is not None else bool(cfg.endpoint)
    out["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false" if path_style else "true"
    return out


def storage_reason(exc: BaseException) -> str:
    """The part of an object-store error that says why (an HTTP status, an AWS error code and
    its message, a refused connection), in one line without request details or colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m|↳", "", str(exc))
    aws = re.search(r"AWS Error (\w+)[^:]*: ([^;(\n]*)", text)
    if aws:
        detail = aws.group(2).strip().removesuffix("No response body.").strip()
        return f"{aws.group(1)}: {detail}" if detail else aws.group(1)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^\d{3} \w", ln) or "refused" in ln.lower() or "dns" in ln.lower():
            return ln
    return lines[0] if lines else type(exc).__name__


def check_access(uri: str, cfg: StorageConfig | None = None) -> None:
    """Make sure the bucket of ``uri`` exists and its prefix can be listed with the current
    settings (nothing for a local path); called before a run does any work.

    Raises:
        StorageError: no such bucket, credentials refused, server unreachable (one line).
    """
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return
    fs, p = filesystem(uri, cfg)
    try:
        if fs.get_file_info(p.split("/", 1)[0]).type == pafs.FileType.NotFound:
            raise StorageError(f"cannot reach {uri}: no such bucket")
        fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot reach {uri}: {storage_reason(exc)} ({WHERE_SETTINGS})") from None


def exists(path: str, cfg: StorageConfig | None = None) -> bool:
    """True when ``path`` is an existing file (or object)."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path, cfg)
    return fs.get_file_info(p).type == pafs.FileType.File


def size(path: str, cfg: StorageConfig | None = None) -> int:
    """Bytes of the file (or object) ``path``."""
    fs, p = filesystem(path, cfg)
    return int(fs.get_file_info(p).size)


def read_bytes(path: str, cfg: StorageConfig | None = None) -> bytes:
    """The whole content of the file (or object) ``path``.

    Raises:
        FileNotFoundError: no such file (or object).
    """
    fs, p = filesystem(path, cfg)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write ``data`` as the file (or object) ``path``, atomically for readers (a local file is
    written beside it and renamed; parent folders are created)."""
    if is_remote(path):
        fs, p = filesystem(path, cfg)
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    path = os.path.abspath(path.removeprefix("file://"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def open_output(path: str, cfg: StorageConfig | None = None) -> Any:
    """A writable binary stream to the object ``path`` (parent folders created for a local
    path). The object appears when the stream is closed."""
    fs, p = filesystem(path, cfg)
    if not is_remote(path):
        os.makedirs(os.path.dirname(p), exist_ok=True)
    return fs.open_output_stream(p)


def remove_tree(path: str, cfg: StorageConfig | None = None) -> None:
    """Delete the folder (or key prefix) ``path`` and everything under it; nothing when absent."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path, cfg)
    if fs.get_file_info(p).type != pafs.FileType.NotFound or is_remote(path):
        try:
            fs.delete_dir(p)
        except FileNotFoundError:
            pass


__all__ = ["StorageError", "RangedFile", "storage_reason", "check_access", "is_remote", "join", "filesystem", "delta_uri",
           "s3a_settings", "delta_options", "exists", "size", "read_bytes", "write_bytes",
           "open_output", "remove_tree"]
