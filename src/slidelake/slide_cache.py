"""Slides on object storage: listed in the bucket, read from a bounded local copy.

OpenSlide reads local files only (its maintainers point to FUSE mounts for object storage), so
a slide at an ``s3://`` URI is copied into a cache folder of the machine that reads it
(``storage.cache_dir``, default ``~/.cache/slidelake/slides``) and opened there; its tables keep
the URI. The copy is streamed through SHA-256 on the way, which is the slide's content
fingerprint (:func:`slidelake.slides.fingerprint_file` of the same bytes on disk). A MIRAX
slide brings its data folder (``<stem>/``). The cache holds at most ``storage.cache_gb`` GB:
the least recently used slides go first, never one used in the last :data:`IN_USE_S` seconds
(another worker may have it open). A copy is current while the object's size and modification
time are those it was copied from.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from typing import Any

from slidelake.config import StorageConfig
from slidelake.storage import filesystem, is_remote

IN_USE_S = 600.0  # a copy used this recently is never evicted
_CHUNK = 1 << 20
_SOURCE = ".source.json"  # beside each copy: the object's size and modification time, the SHA-256


def cache_root(cfg: StorageConfig | None) -> str:
    """The cache folder of ``cfg`` (``storage.cache_dir``, default ``~/.cache/slidelake/slides``)."""
    return os.path.abspath(os.path.expanduser((cfg.cache_dir if cfg else None) or "~/.cache/slidelake/slides"))


def object_info(uri: str, cfg: StorageConfig | None = None) -> tuple[int, float]:
    """``(bytes, modification time as Unix seconds)`` of the object ``uri``.

    Raises:
        FileNotFoundError: no such object.
    """
    import pyarrow.fs as pafs

    fs, p = filesystem(uri, cfg)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such object: {uri}")
    return int(info.size), info.mtime.timestamp() if info.mtime is not None else 0.0


def companions(uri: str, cfg: StorageConfig | None = None) -> list[str]:
    """The objects a slide's bytes are made of besides ``uri``: a MIRAX slide's data folder
    (``<stem>/``, sorted); none for single-file formats."""
    import pyarrow.fs as pafs

    if not uri.lower().endswith(".mrxs"):
        return []
    fs, p = filesystem(uri, cfg)
    stem = p[: -len(".mrxs")]
    infos = fs.get_file_info(pafs.FileSelector(stem, recursive=False, allow_not_found=True))
    scheme = uri.split("://", 1)[0]
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File)


def list_objects(uri: str, recursive: bool = True, cfg: StorageConfig | None = None) -> list[str]:
    """An ``s3://`` input of discovery: ``[uri]`` when it is an object, else the objects under
    the prefix (a ``*``/``?``/``[`` pattern in the last part of the key filters their names,
    case-insensitively), sorted, as URIs.

    Raises:
        FileNotFoundError: neither an object nor a prefix holding objects.
    """
    import fnmatch

    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0]
    fs, key = filesystem(uri, cfg)
    prefix, pattern = key, None
    if any(c in key.rsplit("/", 1)[-1] for c in "*?["):
        prefix, pattern = key.rsplit("/", 1)
    elif fs.get_file_info(key).type == pafs.FileType.File:
        return [uri]
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=recursive, allow_not_found=True))
    if not infos and pattern is None:
        raise FileNotFoundError(f"input not found: {uri}")
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File
                  and (pattern is None or fnmatch.fnmatch(i.path.rsplit("/", 1)[-1].lower(), pattern.lower())))


def _copy(uri: str, dst: str, cfg: StorageConfig | None, digest: Any) -> None:
    fs, p = filesystem(uri, cfg)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{uuid.uuid4().hex[:8]}.part"
    try:
        with fs.open_input_stream(p) as src, open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _current(uri: str, size: int, mtime: float, cfg: StorageConfig | None) -> tuple[str, str] | None:
    """``(local path, SHA-256)`` of the cached copy of ``uri`` when it was copied from an object
    of this ``size`` and ``mtime`` (then marked most recently used), else None."""
    folder = os.path.join(cache_root(cfg), hashlib.sha256(uri.encode()).hexdigest()[:24])
    local, source = os.path.join(folder, os.path.basename(uri)), os.path.join(folder, _SOURCE)
    try:
        with open(source) as f:
            known = json.load(f)
        if known["size"] == size and known["mtime"] == mtime and os.path.isfile(local):
            os.utime(source)
            return local, known["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def cached_copy(uri: str, cfg: StorageConfig | None = None) -> str | None:
    """The current local copy of the object ``uri`` in this machine's cache, or None (nothing
    is copied). Raises ``FileNotFoundError`` when the object is gone."""
    known = _current(uri, *object_info(uri, cfg), cfg)
    return known[0] if known is not None else None


def local_copy(uri: str, cfg: StorageConfig | None = None) -> tuple[str, str]:
    """A local copy of the slide at ``uri`` (and of its :func:`companions`), made when absent or
    stale, and its SHA-256 over the slide's bytes in order. A local path is returned as it is
    (its digest then empty: :func:`slidelake.slides.fingerprint_file` reads it).

    Returns:
        ``(local path, SHA-256 hex digest)``.

    Raises:
        FileNotFoundError: the object is gone. OSError: the store cannot be read.
    """
    if not is_remote(uri):
        return uri, ""
    size, mtime = object_info(uri, cfg)
    known = _current(uri, size, mtime, cfg)
    if known is not None:
        return known
    folder = os.path.join(cache_root(cfg), hashlib.sha256(uri.encode()).hexdigest()[:24])
    local = os.path.join(folder, os.path.basename(uri))
    source = os.path.join(folder, _SOURCE)
    evict(cfg, keep=folder, incoming=size)
    digest = hashlib.sha256()
    _copy(uri, local, cfg, digest)
    stem = os.path.join(folder, os.path.splitext(os.path.basename(uri))[0])
    for part in companions(uri, cfg):
        _copy(part, os.path.join(stem, os.path.basename(part)), cfg, digest)
    tmp = f"{source}.{uuid.uuid4().hex[:8]}"  # workers may copy the same slide at once: each its own
    with open(tmp, "w") as f:
        json.dump({"uri": uri, "size": size, "mtime": mtime, "sha256": digest.hexdigest()}, f)
    os.replace(tmp, source)
    return local, digest.hexdigest()


def _size(path: str) -> int:
    """Bytes of ``path``; 0 when another worker renamed or removed it meanwhile."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def evict(cfg: StorageConfig | None, keep: str | None = None, incoming: int = 0) -> list[str]:
    """Delete the least recently used copies until the cache plus ``incoming`` bytes fits
    ``storage.cache_gb``; ``keep`` and copies used in the last :data:`IN_USE_S` seconds stay.
    Returns the folders deleted."""
    import shutil

    root = cache_root(cfg)
    limit = (cfg.cache_gb if cfg else StorageConfig().cache_gb) * 1e9
    entries = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        size = sum(_size(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
        try:
            used = os.path.getmtime(os.path.join(folder, _SOURCE))
        except OSError:  # no record yet: a copy being made
            used = time.time()
        entries.append((used, folder, size))
    total = sum(e[2] for e in entries) + incoming
    gone = []
    for used, folder, size in sorted(entries):
        if total <= limit:
            break
        if folder == keep or time.time() - used < IN_USE_S:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        gone.append(folder)
    return gone


__all__ = ["IN_USE_S", "cache_root", "object_info", "list_objects", "companions", "cached_copy", "local_copy",
           "evict"]
