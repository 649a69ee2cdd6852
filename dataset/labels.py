"""Image-level labels: the ``id<TAB>1-based classes`` TSV, and resolving them for a run's ids.

Sources, in order: the dataset's shipped TSV, else derived from the dataset (``DatasetInfo.label_source``
/ ``derive_labels``: VOC's XML or masks, COCO's masks or instances JSON). Derived labels are cached in a
TSV; a sidecar ``<cache>.sources.json`` records for each derived id the source file with its size and
modification time, so a regenerated dataset (e.g. the demo with another seed, same ids) is derived again
instead of silently reusing stale labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset.base import DatasetInfo
from misc.errors import UserError
from misc.io import atomic_write


def load_cls_labels(path: str | os.PathLike, num_classes: int) -> dict[str, np.ndarray]:
    """Read ``id<TAB>1-based class indices`` lines into ``{id: float32 (num_classes,)}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} is missing: run the make_cls_labels step first.")
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, rest = line.partition("\t")
        try:
            classes = [int(t) - 1 for t in rest.split()]
        except ValueError as e:
            raise UserError(f"{path}:{n}: malformed line {line!r} (expected id<TAB>class numbers).") from e
        if any(not 0 <= c < num_classes for c in classes):
            raise UserError(f"{path}:{n}: class numbers must lie in 1..{num_classes}: {line!r}.")
        y = np.zeros(num_classes, dtype=np.float32)
        y[classes] = 1.0
        labels[name.strip()] = y
    return labels


def save_cls_labels(path: str | os.PathLike, labels: Mapping[str, np.ndarray]) -> None:
    """Write ``{id: multi-hot (C,)}`` as sorted ``id<TAB>1-based class indices`` lines, atomically."""
    lines = [
        name + "\t" + " ".join(str(int(c) + 1) for c in np.flatnonzero(np.asarray(y) > 0.5))
        for name, y in sorted(labels.items())
    ]
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _source_stamp(info: DatasetInfo, path: Path) -> str:
    st = path.stat()
    try:
        shown = path.relative_to(info.root)
    except ValueError:
        shown = path
    return f"{shown}:{st.st_size}:{st.st_mtime_ns}"


def resolve_labels(info: DatasetInfo, ids: Sequence[str], cache_tsv: str | os.PathLike) -> dict[str, np.ndarray]:
    """Labels ``{id: float32 (num_classes,)}`` for ``ids``: shipped where available, else derived and cached.

    ``cache_tsv`` is (re)written with the labels of all ``ids``; derived entries whose source file is
    unchanged since the last run are reused from it.
    """
    cache_tsv = Path(cache_tsv)
    sources_json = cache_tsv.with_name(cache_tsv.name + ".sources.json")
    shipped_tsv = info.shipped_labels()
    shipped = load_cls_labels(shipped_tsv, info.num_classes) if shipped_tsv is not None else {}
    cached, cached_sources = {}, {}
    if cache_tsv.is_file() and sources_json.is_file():
        cached = load_cls_labels(cache_tsv, info.num_classes)
        cached_sources = json.loads(sources_json.read_text())

    unique = list(dict.fromkeys(ids))
    labels = {name: shipped[name] for name in unique if name in shipped}
    sources: dict[str, str] = {}
    to_derive: list[tuple[str, Path]] = []
    if len(labels) < len(unique):
        info.check()
    for name in unique:
        if name in shipped:
            continue
        path = info.label_source(name)
        sources[name] = _source_stamp(info, path)
        if name in cached and cached_sources.get(name) == sources[name]:
            labels[name] = cached[name]
        else:
            to_derive.append((name, path))
    for name, path in tqdm(to_derive, desc="deriving image-level labels", disable=not to_derive):
        labels[name] = info.derive_labels(path)
    labels = {name: labels[name] for name in unique}

    unchanged = cached.keys() == labels.keys() and cached_sources == sources and not to_derive
    if not unchanged:
        save_cls_labels(cache_tsv, labels)
        with atomic_write(sources_json, "w") as f:
            json.dump(sources, f, indent=0, sort_keys=True)
    return labels
