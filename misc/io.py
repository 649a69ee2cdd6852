"""Atomic file output and the on-disk formats that steps hand to each other."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from misc.errors import UserError

TMP_SUFFIX = ".tmp"  # temporary files of atomic_write: ``.<name>.<random>.tmp`` beside their target


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path`` and move it into place only if the block succeeds.

    An interrupted step therefore never leaves a truncated output that a resumed run would trust. The file
    gets the permissions a plain ``open`` would give it (the umask's), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_cam(path: str | os.PathLike, keys: np.ndarray, cam: np.ndarray, high_res: np.ndarray) -> None:
    """Save one image's CAMs: keys int64 (k,), cam (k, H4, W4) and high_res (k, H, W) as float16."""
    with atomic_write(path) as f:
        np.savez(
            f,
            keys=np.asarray(keys, dtype=np.int64),
            cam=np.asarray(cam, dtype=np.float16),
            high_res=np.asarray(high_res, dtype=np.float16),
        )


def load_cam(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a CAM file written by ``save_cam``; maps come back as float32."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CAM file {path} is missing: run the make_cam step first (--make_cam_pass true).")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {
                "keys": data["keys"].astype(np.int64),
                "cam": data["cam"].astype(np.float32),
                "high_res": data["high_res"].astype(np.float32),
            }
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"CAM file {path} is unreadable ({e}): delete it and re-run make_cam.") from e


def save_png(path: str | os.PathLike, label: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Save a uint8 (H, W) label map as a PNG, as a palette image when ``palette`` (256*3,) is given."""
    img = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L" if palette is None else None)
    if palette is not None:
        img = img.convert("P")
        img.putpalette(list(np.asarray(palette, dtype=np.uint8).reshape(-1)))
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def load_png(path: str | os.PathLike) -> np.ndarray:
    """Load a single-channel (or palette) PNG as uint8 (H, W) label values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} is missing.")
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise UserError(f"{path} is a {img.mode} image, expected a single-channel label map.")
            return np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"label file {path} is unreadable ({e}).") from e


def save_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


def metrics_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What a metrics row measures: its round, step, post-processing and training labels (pseudo or gt)."""
    return row.get("variant", "-"), row["step"], row.get("postprocess"), row.get("labels")


# A run's work dir holds this file while its steps run (and after a crash): written when the driver starts the
# steps, removed when the last one has finished.
IN_PROGRESS = "run.in_progress"


def record_metrics(work_dir: str | os.PathLike, row: dict[str, Any]) -> None:
    """Write one result into ``<work_dir>/metrics.jsonl`` (one JSON object a line), replacing the row that
    measured the same thing before (``metrics_key``): re-running a step updates its number, never doubles it."""
    path = Path(work_dir) / "metrics.jsonl"
    rows = [r for r in read_metrics(work_dir) if metrics_key(r) != metrics_key(row)]
    with atomic_write(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in [*rows, row]))


def read_metrics(work_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(work_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_metrics(work_dir: str | os.PathLike) -> dict[tuple[str, str, str | None], dict[str, Any]]:
    """The latest row of every (variant, step, postprocess) in ``metrics.jsonl``, in first-seen order; a
    segmenter trained on ground truth (the upper bound) is the variant ``gt``."""
    latest: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for row in read_metrics(work_dir):
        variant = "gt" if row.get("labels") == "gt" else row.get("variant", "-")
        latest[(variant, row["step"], row.get("postprocess"))] = row
    return latest


def files_fingerprint(files: Iterable[tuple[str, str | os.PathLike]]) -> str:
    """Identity of named files ``(name, path)`` by their names, sizes and modification times: cheap, and it
    changes whenever a file is replaced (labels or maps a user puts in a folder: new files, new outputs)."""
    h = hashlib.sha1()
    for name, path in files:
        stat = Path(path).stat()
        h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
