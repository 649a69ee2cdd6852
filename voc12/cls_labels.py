"""Image-level labels for ids that the shipped ``voc12/data/cls_labels.tsv`` does not cover (spec 1.3).

Sources, in order: ``Annotations/<id>.xml`` (every ``<object><name>`` that is a VOC class, difficult and
truncated objects included, as the reference did), then ``SegmentationClassAug/<id>.png``, then
``SegmentationClass/<id>.png`` (classes present in the mask, 0 and 255 ignored).

Derived labels are cached in a TSV; a sidecar ``<cache>.sources.json`` records for each derived id the
source file with its size and modification time, so a regenerated dataset (e.g. the demo with another
seed, same ids) is derived again instead of silently reusing stale labels.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from misc.errors import UserError
from misc.io import atomic_write, load_png
from voc12.dataset import (
    CLASS_NAMES,
    IGNORE,
    NUM_CLASSES,
    VOCLayout,
    labels_to_multi_hot,
    load_cls_labels,
    save_cls_labels,
)


def labels_from_xml(path: str | os.PathLike) -> np.ndarray:
    """Multi-hot float32 ``(20,)`` of the VOC class names among the ``<object><name>`` of a VOC XML."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise UserError(f"annotation {path} is not valid XML ({e}): replace it or delete it.") from e
    names = {(obj.findtext("name") or "").strip() for obj in root.iter("object")}
    return labels_to_multi_hot([CLASS_NAMES.index(n) for n in names if n in CLASS_NAMES])


def labels_from_mask(path: str | os.PathLike) -> np.ndarray:
    """Multi-hot float32 ``(20,)`` of the classes present in a VOC label PNG (values ``c + 1``)."""
    values = set(np.unique(load_png(path)).tolist()) - {0, IGNORE}
    bad = sorted(v for v in values if v > NUM_CLASSES)
    if bad:
        raise UserError(f"mask {path} has values {bad[:5]} outside 0..{NUM_CLASSES} and 255: not a VOC mask.")
    return labels_to_multi_hot([v - 1 for v in values])


def label_source(layout: VOCLayout, name: str) -> Path:
    """The file the labels of ``name`` are derived from: XML, else SegmentationClassAug, else SegmentationClass."""
    for path in (layout.annotation(name), layout.seg_class_aug(name), layout.seg_class(name)):
        if path.is_file():
            return path
    raise UserError(
        f"no image-level label for {name}: it is not in the shipped labels and {layout.root} has neither "
        f"{layout.annotation(name).relative_to(layout.root)} nor a SegmentationClass(Aug) mask for it."
    )


def derive_labels(path: Path) -> np.ndarray:
    """Labels from a source returned by ``label_source``."""
    return labels_from_xml(path) if path.suffix == ".xml" else labels_from_mask(path)


def _fingerprint(layout: VOCLayout, path: Path) -> str:
    st = path.stat()
    return f"{path.relative_to(layout.root)}:{st.st_size}:{st.st_mtime_ns}"


def resolve_labels(
    root: str | os.PathLike,
    ids: Sequence[str],
    shipped_tsv: str | os.PathLike | None,
    cache_tsv: str | os.PathLike,
) -> dict[str, np.ndarray]:
    """Labels ``{id: float32 (20,)}`` for ``ids``: shipped where available, else derived and cached.

    ``cache_tsv`` is (re)written with the labels of all ``ids``; derived entries whose source file is
    unchanged since the last run are reused from it.
    """
    layout = VOCLayout(root)
    cache_tsv = Path(cache_tsv)
    sources_json = cache_tsv.with_name(cache_tsv.name + ".sources.json")
    shipped = load_cls_labels(shipped_tsv) if shipped_tsv is not None else {}
    cached, cached_sources = {}, {}
    if cache_tsv.is_file() and sources_json.is_file():
        cached = load_cls_labels(cache_tsv)
        cached_sources = json.loads(sources_json.read_text())

    unique = list(dict.fromkeys(ids))
    labels = {name: shipped[name] for name in unique if name in shipped}
    sources: dict[str, str] = {}
    to_derive: list[tuple[str, Path]] = []
    if len(labels) < len(unique):
        layout.check()
    for name in unique:
        if name in shipped:
            continue
        path = label_source(layout, name)
        sources[name] = _fingerprint(layout, path)
        if name in cached and cached_sources.get(name) == sources[name]:
            labels[name] = cached[name]
        else:
            to_derive.append((name, path))
    for name, path in tqdm(to_derive, desc="deriving image-level labels", disable=not to_derive):
        labels[name] = derive_labels(path)
    labels = {name: labels[name] for name in unique}

    unchanged = cached.keys() == labels.keys() and cached_sources == sources and not to_derive
    if not unchanged:
        save_cls_labels(cache_tsv, labels)
        with atomic_write(sources_json, "w") as f:
            json.dump(sources, f, indent=0, sort_keys=True)
    return labels
