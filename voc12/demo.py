"""The embedded demo dataset: a small synthetic VOC2012-layout dataset generated deterministically.

It is the default dataset when no ``--voc12_root`` is given, so that the whole pipeline (CAM -> IR labels
-> IRN -> pseudo masks -> CDA round -> DeepLab) runs end to end in minutes on a CPU and its numbers mean
something.

Content
-------
Eight real VOC classes (real VOC indices, so every class-indexed table applies unchanged) are drawn with
numpy/PIL as recognisable silhouettes with class-specific textures:

==========  =======================================================  ==================
class       look                                                     typical background
==========  =======================================================  ==================
aeroplane   top view: fuselage, swept wings, tail, engines, stripe    sky
bird        side view: body, head, beak, raised wing, speckled       sky
boat        sail boat (hull with planks, mast, sails) or motor boat  water
car         side view: body, cabin, windows, wheels, headlights      road
cat         sitting side view, ears, tail, tabby stripes             indoor
cow         body, head, legs, Holstein patches (or brown)            grass
sheep       fluffy wool body (bumpy outline), dark head and legs     grass
train       long carriage, nose, window row, stripe, wheels          rails
==========  =======================================================  ==================

Backgrounds are textured (clouds, waves, grass blades, asphalt with lane marks, ballast with sleepers and
rails, wallpaper over a wooden floor). Each image is 128-192 px per side, holds 1-3 objects of 1-2 classes
covering 10-50 % of the image, plus per-pixel noise, a slight blur and JPEG compression, so colour alone
does not separate the classes.

Context bias (what CDA is about)
--------------------------------
Every image has a *primary* class. Its background is the class's typical one for exactly
``round(p_typical * n)`` of the ``n`` images of that primary class (default ``p_typical = 0.85``), and a
uniformly drawn other background otherwise. A second class (probability 0.4) is only ever added when the
background is its own typical one (aeroplane + bird in the sky, cow + sheep on grass, or e.g. a boat
added to an aeroplane image whose background happened to be water). So every class is seen in its
typical context in at least ``p_typical`` of its images (``context_bias`` measures it; about 0.85-0.9).
A classifier can therefore score well from the context alone, and its CAMs spill onto sky, water or
grass: the failure mode that Context Decoupling Augmentation (pasting objects into other images) fixes.

Layout (as VOC2012)
-------------------
``JPEGImages/<id>.jpg`` (quality 90), ``SegmentationClass/<id>.png`` (palette PNG, 0 = background,
``c + 1``, 255 = a void band about 2-3 px wide on every object boundary, like VOC),
``SegmentationObject/<id>.png`` (instance ids 1..n, 255 void), ``Annotations/<id>.xml`` (VOC XML with one
``<object>`` per instance), ``point/segcls/<id>.png`` and ``scribble/seginst/<id>.png`` (sparse labels in
AGMM's layout and encoding, ``dataset.sparse``: two seeded clicks per class present, background included,
and one seeded scribble per connected region of every class; 21 = unlabelled),
``ImageSets/Segmentation/{train_aug,train,val}.txt`` (``train`` is a subset of
``train_aug`` used to evaluate CAMs and pseudo masks, ``val`` is disjoint), plus ``demo_context.tsv``
(``id<TAB>background``) and ``demo_manifest.json``. Ids look like VOC ids, ``2100_000001`` (a year no VOC
image has, so the shipped labels never shadow them).

COCO layout
-----------
``make_demo_coco`` writes the same kind of images in the COCO 2014 layout of ``dataset.coco14``, each shape
labelled with a COCO class (``COCO_CLASS_OF_SHAPE``: cat -> teddy bear, cow -> elephant, car -> truck, ...),
so that mask values above VOC's 20 are exercised end to end.

Determinism: the plan comes from ``default_rng([seed, 0])`` and image ``i`` from ``default_rng([seed, 1,
i])``; the same parameters give byte-identical files. The manifest is written last (atomically) and is
the commit point: with a matching manifest and all files present ``make_demo_dataset`` is a no-op,
otherwise everything is regenerated. The per-image files are written directly rather than through
``misc.io.atomic_write``: its fsync per file would triple the generation time, and nothing trusts them
until the manifest exists.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from dataset.base import IGNORE, read_id_list, voc_palette
from dataset.coco14 import COCO14
from dataset.sparse import SparseLabels, generate_clicks, generate_scribbles
from dataset.voc12 import VOC12
from misc.errors import UserError
from misc.io import save_json

DEMO_CLASSES: tuple[str, ...] = ("aeroplane", "bird", "boat", "car", "cat", "cow", "sheep", "train")
BACKGROUNDS: tuple[str, ...] = ("sky", "water", "grass", "road", "rails", "indoor")
TYPICAL_BACKGROUND: dict[str, str] = {
    "aeroplane": "sky",
    "bird": "sky",
    "boat": "water",
    "car": "road",
    "cat": "indoor",
    "cow": "grass",
    "sheep": "grass",
    "train": "rails",
}
ID_YEAR = "2100"
# The COCO class each demo shape is drawn as in the COCO-layout demo (make_demo_coco). Cat and cow become
# teddy bear (mask value 78) and elephant (21), so mask values above VOC's 20 occur; the others keep a
# COCO class of their own (airplane 5, bird 15, boat 9, truck 8, sheep 19, train 7).
COCO_CLASS_OF_SHAPE: dict[str, str] = {
    "aeroplane": "airplane", "bird": "bird", "boat": "boat", "car": "truck",
    "cat": "teddy bear", "cow": "elephant", "sheep": "sheep", "train": "train",
}  # fmt: skip
# COCO-demo image numbers start here, far above real COCO 2014 numbers (< 600000): COCO_train2014_210000000001.
COCO_ID_BASE = int(ID_YEAR) * 10**8
# The mask value of each demo shape: its own class in the VOC demo, COCO_CLASS_OF_SHAPE's in the COCO demo.
_VOC_MASK_VALUES = {name: VOC12.class_names.index(name) + 1 for name in DEMO_CLASSES}
_COCO_MASK_VALUES = {name: COCO14.class_names.index(coco) + 1 for name, coco in COCO_CLASS_OF_SHAPE.items()}
MANIFEST = "demo_manifest.json"
CONTEXT_FILE = "demo_context.tsv"
FORMAT_VERSION = 1

SIDE_RANGE = (128, 192)  # image height and width, each uniform in this inclusive range
FG_FRACTION = (0.10, 0.50)  # union of the objects' masks over the image area
P_SECOND_CLASS = 0.4
JPEG_QUALITY = 90
DEMO_CLICKS = 2  # clicks per class present in an image (background included) in point/segcls

# box width / height of each class's drawing
_ASPECT = {
    "aeroplane": 1.25, "bird": 1.3, "boat": 1.0, "car": 2.0,
    "cat": 1.3, "cow": 1.5, "sheep": 1.35, "train": 2.8,
}  # fmt: skip

Array = np.ndarray


# ----------------------------------------------------------------------------------------------------
# texture helpers (float32 arrays in 0..255)


def _smooth_noise(h: int, w: int, cell: float, rng: np.random.Generator) -> Array:
    """Value noise ~U[0, 1] with features about ``cell`` px large: (h, w) float32."""
    cell = max(1.0, cell)
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32))
    up = np.asarray(grid.resize((int(gw * cell), int(gh * cell)), Image.Resampling.BICUBIC))
    oy, ox = int(rng.integers(0, int(cell) + 1)), int(rng.integers(0, int(cell) + 1))
    return up[oy : oy + h, ox : ox + w]


def _jitter(rgb: tuple[float, float, float], rng: np.random.Generator, amount: float = 18.0) -> Array:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def _fill(h: int, w: int, rgb: Array) -> Array:
    return np.broadcast_to(np.asarray(rgb, np.float32), (h, w, 3)).copy()


# ----------------------------------------------------------------------------------------------------
# backgrounds: (H, W, rng) -> float32 (H, W, 3)


def _bg_sky(h: int, w: int, rng: np.random.Generator) -> Array:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = _jitter((55, 115, 200), rng) * (1 - t) + _jitter((165, 200, 235), rng) * t
    clouds = 0.6 * _smooth_noise(h, w, rng.uniform(25, 50), rng) + 0.4 * _smooth_noise(h, w, 8, rng)
    c = np.clip((clouds - rng.uniform(0.45, 0.6)) * 3.0, 0, 1)[..., None]
    return img * (1 - c) + (235 + 15 * _smooth_noise(h, w, 4, rng))[..., None] * c


def _bg_water(h: int, w: int, rng: np.random.Generator) -> Array:
    y = np.arange(h, dtype=np.float32)[:, None]
    phase = 2 * np.pi * (y / rng.uniform(5, 10) + 1.5 * _smooth_noise(h, w, 30, rng))
    waves = np.sin(phase)
    img = _fill(h, w, _jitter((25, 80, 120), rng)) + 22 * waves[..., None]
    glint = (waves > 0.85) & (_smooth_noise(h, w, 3, rng) > 0.6)
    img[glint] += 70
    return img


def _bg_grass(h: int, w: int, rng: np.random.Generator) -> Array:
    blades = np.asarray(
        Image.fromarray(rng.random((h // 6 + 2, w), dtype=np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    )
    patches = _smooth_noise(h, w, 25, rng)
    img = _fill(h, w, _jitter((70, 135, 45), rng, 12))
    img += ((blades - 0.5) * 70 + (patches - 0.5) * 50)[..., None] * np.array([0.6, 1.0, 0.4], np.float32)
    return img


def _bg_road(h: int, w: int, rng: np.random.Generator) -> Array:
    grey = rng.uniform(75, 110)
    img = _fill(h, w, (grey, grey, grey + 4)) + ((_smooth_noise(h, w, 20, rng) - 0.5) * 25)[..., None]
    img += rng.normal(0, 12, (h, w, 1)).astype(np.float32)  # grey speckle of asphalt
    paint = _jitter((235, 235, 225), rng, 10) if rng.random() < 0.7 else _jitter((230, 190, 40), rng, 10)
    for _ in range(int(rng.integers(1, 3))):
        y0, thick = int(rng.integers(0, h - 5)), int(rng.integers(3, 6))
        dash, gap, x = int(rng.integers(18, 30)), int(rng.integers(12, 24)), int(rng.integers(-30, 0))
        while x < w:
            img[y0 : y0 + thick, max(0, x) : max(0, x + dash)] = paint
            x += dash + gap
    return img


def _bg_rails(h: int, w: int, rng: np.random.Generator) -> Array:
    img = _fill(h, w, _jitter((125, 110, 95), rng, 12))
    img += ((_smooth_noise(h, w, 2.5, rng) - 0.5) * 60)[..., None] + rng.normal(0, 14, (h, w, 1)).astype(np.float32)
    sleeper, steel = _jitter((85, 58, 38), rng, 10), _jitter((175, 175, 182), rng, 8)
    for yc in rng.choice(np.arange(20, h - 20), size=int(rng.integers(1, 3)), replace=False):
        period, off = int(rng.integers(11, 16)), int(rng.integers(0, 10))
        for x in range(off, w, period):
            img[yc - 13 : yc + 14, x : x + 6] = sleeper + rng.normal(0, 8, 3)
        for yr in (yc - 8, yc + 6):
            img[yr : yr + 3] = steel
            img[yr : yr + 1] += 40  # polished top of the rail
    return img


def _bg_indoor(h: int, w: int, rng: np.random.Generator) -> Array:
    horizon = int(h * rng.uniform(0.45, 0.65))
    img = np.empty((h, w, 3), np.float32)
    wall = _jitter((205, 190, 160), rng, 35)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(horizon, dtype=np.float32)[:, None]
    period = rng.uniform(8, 16)
    if rng.random() < 0.5:  # striped wallpaper
        pattern = (np.sin(2 * np.pi * x / period) > 0).astype(np.float32) + 0 * y
    else:  # dotted wallpaper
        pattern = ((np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period)) > 0.6).astype(np.float32)
    img[:horizon] = wall - 30 * pattern[..., None]
    wood = _jitter((150, 100, 60), rng, 20)
    plank = int(rng.integers(9, 15))
    for y0 in range(horizon, h, plank):
        shade = rng.uniform(-18, 18)
        grain = 12 * np.sin(2 * np.pi * (x[0] / rng.uniform(20, 40) + 2 * _smooth_noise(1, w, 15, rng)[0]))
        img[y0 : y0 + plank] = wood + shade + grain[None, :, None]
        img[y0] = wood - 45  # seam between planks
    img[max(0, horizon - 4) : horizon] = _jitter((240, 235, 225), rng, 10)  # skirting board
    return img + rng.normal(0, 5, (h, w, 1)).astype(np.float32)


_BACKGROUND_FNS: dict[str, Callable[[int, int, np.random.Generator], Array]] = {
    "sky": _bg_sky,
    "water": _bg_water,
    "grass": _bg_grass,
    "road": _bg_road,
    "rails": _bg_rails,
    "indoor": _bg_indoor,
}


# ----------------------------------------------------------------------------------------------------
# object shapes: (h, w, rng) -> uint8 part map (h, w), 0 = outside the object, 1.. = parts


class _Canvas:
    """Draws parts with coordinates given as fractions of the box."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.img = Image.new("L", (w, h), 0)
        self.draw = ImageDraw.Draw(self.img)

    def _xy(self, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * (self.w - 1), y * (self.h - 1)) for x, y in pts]

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, part: int) -> None:
        self.draw.ellipse(self._xy([(x0, y0), (x1, y1)]), fill=part)

    def rect(self, x0: float, y0: float, x1: float, y1: float, part: int) -> None:
        self.draw.rectangle(self._xy([(x0, y0), (x1, y1)]), fill=part)

    def poly(self, pts: list[tuple[float, float]], part: int) -> None:
        self.draw.polygon(self._xy(pts), fill=part)

    def line(self, pts: list[tuple[float, float]], width: float, part: int) -> None:
        self.draw.line(self._xy(pts), fill=part, width=max(2, round(width * self.h)), joint="curve")

    def parts(self) -> Array:
        return np.asarray(self.img)


def _shape_aeroplane(h: int, w: int, rng: np.random.Generator) -> Array:
    c = _Canvas(h, w)
    sweep = rng.uniform(0.08, 0.2)
    for s in (1, -1):  # upper and lower wing / stabiliser, mirrored about y = 0.5
        wing = [(0.62, 0.47), (0.45, 0.47), (0.45 - sweep, 0.0), (0.53 - sweep, 0.0)]
        stabiliser = [(0.18, 0.47), (0.09, 0.47), (0.02, 0.27), (0.08, 0.27)]
        for pts in (wing, stabiliser):
            c.poly([(x, 0.5 + s * (y - 0.5)) for x, y in pts], 1)
        c.ellipse(*(0.43 - sweep / 2, 0.5 + s * 0.25 - 0.05, 0.55 - sweep / 2, 0.5 + s * 0.25 + 0.05), 3)
    c.ellipse(0.0, 0.4, 1.0, 0.6, 1)
    c.rect(0.05, 0.48, 0.9, 0.52, 2)  # livery stripe along the fuselage
    c.ellipse(0.86, 0.45, 0.95, 0.55, 4)  # cockpit
    return c.parts()


def _shape_bird(h: int, w: int, rng: np.random.Generator) -> Array:
    c = _Canvas(h, w)
    c.poly([(0.0, 0.38), (0.28, 0.48), (0.28, 0.62), (0.0, 0.72)], 2)  # tail
    c.ellipse(0.18, 0.38, 0.75, 0.78, 1)
    c.ellipse(0.62, 0.18, 0.9, 0.52, 1)
    c.poly([(0.88, 0.3), (1.0, 0.38), (0.88, 0.44)], 3)  # beak
    c.ellipse(0.76, 0.27, 0.81, 0.33, 4)  # eye
    tip = rng.uniform(0.0, 0.15)
    c.poly([(0.3, 0.55), (0.62, 0.5), (0.3 + tip, 0.02 + tip)], 2)  # raised wing
    return c.parts()


def _shape_boat(h: int, w: int, rng: np.random.Generator) -> Array:
    c = _Canvas(h, w)
    c.poly([(0.0, 0.6), (1.0, 0.6), (0.85, 0.95), (0.12, 0.95)], 1)  # hull
    if rng.random() < 0.6:  # sail boat
        c.line([(0.46, 0.03), (0.46, 0.62)], 0.035, 3)
        c.poly([(0.49, 0.04), (0.49, 0.57), (0.88, 0.57)], 2)
        c.poly([(0.43, 0.12), (0.43, 0.57), (0.15, 0.57)], 2)
    else:  # motor boat: cabin with windows
        c.poly([(0.25, 0.62), (0.3, 0.3), (0.7, 0.3), (0.78, 0.62)], 2)
        for x in (0.34, 0.47, 0.6):
            c.rect(x, 0.38, x + 0.09, 0.5, 4)
        c.line([(0.5, 0.1), (0.5, 0.3)], 0.03, 3)
    return c.parts()


def _shape_car(h: int, w: int, rng: np.random.Generator) -> Array:
    c = _Canvas(h, w)
    roof = rng.uniform(0.05, 0.2)
    c.poly([(0.2, 0.47), (0.3, roof), (0.68, roof), (0.82, 0.47)], 1)  # cabin
    c.poly([(0.0, 0.5), (0.05, 0.42), (0.95, 0.42), (1.0, 0.55), (1.0, 0.85), (0.0, 0.85)], 1)
    c.poly([(0.27, 0.44), (0.34, roof + 0.06), (0.48, roof + 0.06), (0.48, 0.44)], 4)
    c.poly([(0.51, 0.44), (0.51, roof + 0.06), (0.66, roof + 0.06), (0.76, 0.44)], 4)
    for x in (0.12, 0.66):
        c.ellipse(x, 0.66, x + 0.22, 1.0, 3)
        c.ellipse(x + 0.06, 0.76, x + 0.16, 0.9, 5)
    c.rect(0.95, 0.5, 1.0, 0.6, 6)  # headlight
    return c.parts()


def _shape_cat(h: int, w: int, rng: np.random.Generator) -> Array:
    c = _Canvas(h, w)
    tail_tip = rng.uniform(0.0, 0.25)
    c.line([(0.2, 0.6), (0.06, 0.4), (0.03, tail_tip)], 0.08, 1)
    c.ellipse(0.15, 0.35, 0.75, 0.82, 1)
    for x0 in (0.22, 0.34, 0.55, 0.65):
        c.rect(x0, 0.7, x0 + 0.08, 1.0, 1)
    c.ellipse(0.6, 0.12, 0.92, 0.52, 1)
    c.poly([(0.62, 0.25), (0.66, 0.0), (0.75, 0.16)], 1)  # ears
    c.poly([(0.79, 0.16), (0.88, 0.0), (0.91, 0.25)], 1)
    c.ellipse(0.68, 0.25, 0.73, 0.32, 4)  # eyes
    c.ellipse(0.8, 0.25, 0.85, 0.32, 4)
    c.ellipse(0.75, 0.36, 0.79, 0.4, 3)  # nose
    return c.parts()


def _shape_cow(h: int, w: int, rng: np.random.Generator) -> Array:
    c = _Canvas(h, w)
    c.line([(0.13, 0.3), (0.06, 0.6)], 0.04, 1)  # tail
    for x0 in (0.16, 0.27, 0.62, 0.72):
        c.rect(x0, 0.55, x0 + 0.07, 1.0, 1)
        c.rect(x0, 0.93, x0 + 0.07, 1.0, 3)  # hooves
    c.ellipse(0.1, 0.22, 0.84, 0.7, 1)
    c.poly([(0.76, 0.2), (0.95, 0.15), (1.0, 0.5), (0.84, 0.55)], 1)  # head
    c.poly([(0.8, 0.2), (0.78, 0.06), (0.84, 0.18)], 3)  # horns
    c.poly([(0.92, 0.17), (0.96, 0.04), (0.96, 0.17)], 3)
    c.ellipse(0.44, 0.6, 0.56, 0.74, 2)  # udder
    return c.parts()


def _shape_sheep(h: int, w: int, rng: np.random.Generator) -> Array:
    c = _Canvas(h, w)
    for x0 in (0.2, 0.32, 0.56, 0.66):
        c.rect(x0, 0.6, x0 + 0.05, 1.0, 2)
    c.ellipse(0.12, 0.25, 0.78, 0.72, 1)
    # Wool puffs along the outline make the bumpy silhouette.
    for a in np.linspace(0, 2 * np.pi, 14, endpoint=False):
        cx, cy = 0.45 + 0.31 * math.cos(a), 0.48 + 0.22 * math.sin(a)
        r = rng.uniform(0.07, 0.1)
        c.ellipse(cx - r, cy - r * 1.3, cx + r, cy + r * 1.3, 1)
    c.ellipse(0.72, 0.25, 0.98, 0.62, 2)  # head
    c.ellipse(0.7, 0.25, 0.8, 0.35, 2)  # ear
    return c.parts()


def _shape_train(h: int, w: int, rng: np.random.Generator) -> Array:
    c = _Canvas(h, w)
    c.rect(0.0, 0.1, 0.92, 0.84, 1)
    c.poly([(0.92, 0.1), (1.0, 0.42), (1.0, 0.84), (0.92, 0.84)], 1)  # nose
    c.rect(0.0, 0.1, 0.92, 0.17, 5)  # roof
    c.rect(0.0, 0.6, 0.99, 0.67, 2)  # livery stripe
    n_win = int(rng.integers(5, 8))
    for i in range(n_win):
        x0 = 0.04 + i * 0.86 / n_win
        c.rect(x0, 0.25, x0 + 0.6 * 0.86 / n_win, 0.5, 4)
    c.poly([(0.93, 0.2), (0.985, 0.42), (0.93, 0.42)], 4)  # windscreen
    for x in np.linspace(0.06, 0.86, 6):
        c.ellipse(x - 0.035, 0.78, x + 0.035, 1.0, 3)
    return c.parts()


_SHAPE_FNS: dict[str, Callable[[int, int, np.random.Generator], Array]] = {
    "aeroplane": _shape_aeroplane,
    "bird": _shape_bird,
    "boat": _shape_boat,
    "car": _shape_car,
    "cat": _shape_cat,
    "cow": _shape_cow,
    "sheep": _shape_sheep,
    "train": _shape_train,
}


# ----------------------------------------------------------------------------------------------------
# object colours: (part map, rng) -> float32 (h, w, 3); only pixels with part > 0 matter


def _paint(parts: Array, colours: dict[int, Array]) -> Array:
    out = np.zeros(parts.shape + (3,), np.float32)
    for part, rgb in colours.items():
        out[parts == part] = rgb
    return out


def _shading(h: int, w: int, lo: float = 0.8, hi: float = 1.1) -> Array:
    """Top-lit vertical gradient, (h, 1, 1), so the objects do not look flat."""
    return np.linspace(hi, lo, h, dtype=np.float32)[:, None, None] + np.zeros((1, w, 1), np.float32)


def _col_aeroplane(parts: Array, rng: np.random.Generator) -> Array:
    livery = [(200, 30, 40), (30, 60, 160), (230, 140, 20), (20, 120, 80)][int(rng.integers(4))]
    img = _paint(parts, {1: _jitter((222, 224, 230), rng, 12), 2: _jitter(livery, rng, 20),
                         3: _jitter((70, 72, 80), rng, 10), 4: _jitter((30, 40, 60), rng, 10)})  # fmt: skip
    return img * _shading(*parts.shape, 0.9, 1.05)


def _col_bird(parts: Array, rng: np.random.Generator) -> Array:
    body = [(115, 80, 50), (45, 45, 50), (90, 105, 130), (160, 120, 70)][int(rng.integers(4))]
    img = _paint(parts, {1: _jitter(body, rng, 15), 2: _jitter(body, rng, 10) * 0.6,
                         3: _jitter((235, 160, 30), rng, 15), 4: np.array([10, 10, 10], np.float32)})  # fmt: skip
    h, w = parts.shape
    speckle = (_smooth_noise(h, w, 1.5, rng) > 0.72) & (parts == 1)  # light spots on the breast
    img[speckle] += 70
    feathers = np.sin(np.arange(w, dtype=np.float32) * 1.6)[None, :] > 0.3
    img[(parts == 2) & feathers] *= 0.6  # barred wing and tail
    return img


def _col_boat(parts: Array, rng: np.random.Generator) -> Array:
    hull = [(170, 35, 35), (30, 45, 100), (235, 235, 235), (40, 40, 40)][int(rng.integers(4))]
    img = _paint(parts, {1: _jitter(hull, rng, 15), 2: _jitter((240, 238, 225), rng, 10),
                         3: _jitter((110, 75, 40), rng, 10), 4: _jitter((40, 60, 80), rng, 10)})  # fmt: skip
    planks = (np.arange(parts.shape[0]) % 5 == 0)[:, None] & (parts == 1)
    img[planks] *= 0.6
    return img * _shading(*parts.shape)


def _col_car(parts: Array, rng: np.random.Generator) -> Array:
    paint = [(200, 20, 25), (25, 60, 190), (240, 200, 20), (185, 188, 195), (20, 20, 25)][int(rng.integers(5))]
    img = _paint(parts, {1: _jitter(paint, rng, 15), 3: _jitter((25, 25, 25), rng, 5),
                         4: _jitter((140, 180, 210), rng, 15), 5: _jitter((180, 180, 185), rng, 10),
                         6: _jitter((255, 240, 160), rng, 10)})  # fmt: skip
    img[parts == 4] *= _shading(*parts.shape, 0.7, 1.2)[parts == 4]  # reflections on the glass
    return img * _shading(*parts.shape, 0.75, 1.15)


def _col_cat(parts: Array, rng: np.random.Generator) -> Array:
    fur = [(205, 125, 55), (135, 135, 135), (110, 85, 60)][int(rng.integers(3))]
    img = _paint(parts, {1: _jitter(fur, rng, 15), 3: _jitter((220, 140, 150), rng, 10),
                         4: _jitter((90, 170, 60), rng, 15)})  # fmt: skip
    h, w = parts.shape
    x = np.arange(w, dtype=np.float32)[None, :]
    stripes = np.sin(2 * np.pi * (x / max(4.0, w / 12) + 0.6 * _smooth_noise(h, w, 8, rng))) > 0.35
    img[(parts == 1) & stripes] *= 0.55  # tabby stripes
    return img


def _col_cow(parts: Array, rng: np.random.Generator) -> Array:
    h, w = parts.shape
    if rng.random() < 0.7:  # Holstein: black patches on white
        img = _paint(parts, {1: _jitter((235, 232, 225), rng, 8)})
        patches = _smooth_noise(h, w, max(3.0, h / 5), rng) > 0.55
        img[(parts == 1) & patches] = _jitter((25, 22, 20), rng, 8)
    else:  # brown with white spots
        img = _paint(parts, {1: _jitter((135, 75, 35), rng, 15)})
        img[(parts == 1) & (_smooth_noise(h, w, max(3.0, h / 8), rng) > 0.7)] = (225, 215, 200)
    img[parts == 2] = _jitter((230, 160, 160), rng, 10)
    img[parts == 3] = _jitter((50, 45, 40), rng, 8)
    return img


def _col_sheep(parts: Array, rng: np.random.Generator) -> Array:
    h, w = parts.shape
    img = _paint(parts, {1: _jitter((225, 218, 200), rng, 12), 2: _jitter((45, 38, 32), rng, 10)})
    curls = (_smooth_noise(h, w, 2.0, rng) - 0.5) * 70 + (_smooth_noise(h, w, 5.0, rng) - 0.5) * 30
    img[parts == 1] += curls[parts == 1][:, None]  # curly wool
    return img


def _col_train(parts: Array, rng: np.random.Generator) -> Array:
    livery = [(190, 30, 30), (30, 70, 170), (30, 130, 60), (235, 190, 20)][int(rng.integers(4))]
    img = _paint(parts, {1: _jitter(livery, rng, 15), 2: _jitter((240, 240, 240), rng, 10),
                         3: _jitter((30, 30, 30), rng, 5), 4: _jitter((50, 70, 95), rng, 15),
                         5: _jitter((110, 110, 115), rng, 10)})  # fmt: skip
    return img * _shading(*parts.shape, 0.85, 1.1)


_COLOUR_FNS: dict[str, Callable[[Array, np.random.Generator], Array]] = {
    "aeroplane": _col_aeroplane,
    "bird": _col_bird,
    "boat": _col_boat,
    "car": _col_car,
    "cat": _col_cat,
    "cow": _col_cow,
    "sheep": _col_sheep,
    "train": _col_train,
}


@cache
def _fill_ratio(cls: str) -> float:
    """Mean fraction of its box that a class's drawing covers (to size boxes for a target area)."""
    rng = np.random.default_rng(0)
    h = 100
    return float(np.mean([(_SHAPE_FNS[cls](h, round(h * _ASPECT[cls]), rng) > 0).mean() for _ in range(4)]))


# ----------------------------------------------------------------------------------------------------
# one image


def _draw_object(cls: str, area: float, height: int, width: int, rng: np.random.Generator) -> tuple[Array, Array]:
    """Part map (h, w) and colours (h, w, 3) of one object of about ``area`` pixels that fits the image."""
    aspect = _ASPECT[cls] * rng.uniform(0.85, 1.15)
    box = area / _fill_ratio(cls)
    h, w = math.sqrt(box / aspect), math.sqrt(box * aspect)
    shrink = min(1.0, 0.95 * height / h, 0.95 * width / w)
    h, w = max(12, int(h * shrink)), max(12, int(w * shrink))
    parts = _SHAPE_FNS[cls](h, w, rng)
    if cls in ("aeroplane", "bird"):  # flying things come at any small angle
        parts = np.asarray(Image.fromarray(parts).rotate(rng.uniform(-25, 25), Image.Resampling.NEAREST, expand=True))
        ys, xs = np.nonzero(parts)
        parts = parts[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        ph, pw = parts.shape
        if ph > height or pw > width:  # rotation grew the box past the image: shrink it back
            s = 0.95 * min(height / ph, width / pw)
            parts = np.asarray(Image.fromarray(parts).resize((int(pw * s), int(ph * s)), Image.Resampling.NEAREST))
    if rng.random() < 0.5:
        parts = np.ascontiguousarray(parts[:, ::-1])
    return parts, _COLOUR_FNS[cls](parts, rng)


def _layout(classes: list[int], n_objects: int, rng: np.random.Generator) -> list[str]:
    """Class name of each object: every class at least once, the rest drawn among them."""
    names = [DEMO_CLASSES[c] for c in classes]
    return names + [names[int(rng.integers(len(names)))] for _ in range(n_objects - len(names))]


def _render(
    background: str, classes: list[int], rng: np.random.Generator, mask_values: Mapping[str, int]
) -> tuple[Array, Array, Array, list[tuple[str, tuple[int, int, int, int]]]]:
    """One image: (rgb uint8 (H, W, 3), class map uint8 (H, W), instance map uint8 (H, W), [(shape, box)]).

    ``mask_values``: the class map value of each demo shape (``DEMO_CLASSES`` name), the dataset's encoding.
    """
    height, width = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, 2))
    if len(classes) == 2:
        n_objects = 3 if rng.random() < 0.3 else 2
    else:
        n_objects = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    names = _layout(classes, n_objects, rng)
    for _attempt in range(8):  # resample the sizes until the union lands in FG_FRACTION
        inst = np.zeros((height, width), np.uint8)
        shares = rng.dirichlet(np.full(n_objects, 3.0)) * rng.uniform(0.14, 0.42)
        placed = []  # (name, parts, colours, y, x), back to front
        for k, (name, share) in enumerate(zip(names, shares, strict=True), 1):
            parts, colours = _draw_object(name, max(share, 0.04) * height * width, height, width, rng)
            mask = parts > 0
            ph, pw = parts.shape
            # A few tries at a spot that hides little of the objects already placed.
            best = None
            for _ in range(15):
                y, x = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
                overlap = np.count_nonzero(inst[y : y + ph, x : x + pw][mask])
                if best is None or overlap < best[0]:
                    best = (overlap, y, x)
                if overlap <= 0.1 * mask.sum():
                    break
            _, y, x = best
            inst[y : y + ph, x : x + pw][mask] = k
            placed.append((name, parts, colours, y, x))
        visible = np.bincount(inst.ravel(), minlength=n_objects + 1)[1:]
        if FG_FRACTION[0] <= np.count_nonzero(inst) / inst.size <= FG_FRACTION[1] and visible.min() >= 150:
            break
    # Should every retry have failed, drop the objects that are (nearly) hidden: their label would be
    # invisible. The last one drawn is whole and large enough, so at least one object stays.
    placed = [p for p, v in zip(placed, visible, strict=True) if v >= 150]
    canvas = _BACKGROUND_FNS[background](height, width, rng)
    inst = np.zeros((height, width), np.uint8)
    for k, (_, parts, colours, y, x) in enumerate(placed, 1):
        mask = parts > 0
        canvas[y : y + parts.shape[0], x : x + parts.shape[1]][mask] = colours[mask]
        inst[y : y + parts.shape[0], x : x + parts.shape[1]][mask] = k
    canvas += 6 * rng.standard_normal(canvas.shape, dtype=np.float32)
    # A light 3x3 smoothing takes the jaggies off the hard-pasted outlines, like a camera would.
    rgb = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)

    objects = [p[0] for p in placed]
    boxes = [
        (name, (cols.start + 1, rows.start + 1, cols.stop, rows.stop))  # VOC boxes are 1-based, inclusive
        for name, (rows, cols) in zip(objects, ndimage.find_objects(inst), strict=True)
    ]
    cls_lut = np.array([0] + [mask_values[n] for n in objects], np.uint8)
    cls_map = cls_lut[inst]
    # VOC marks object outlines as void: every pixel whose 3x3 neighbourhood sees two instances (or an
    # instance and the background) becomes 255, a band about 2-3 px wide straddling the boundary.
    band = ndimage.maximum_filter(inst, 3) != ndimage.minimum_filter(inst, 3)
    cls_map[band] = IGNORE
    inst[band] = IGNORE
    return np.asarray(rgb), cls_map, inst, boxes


def _annotation_xml(name: str, height: int, width: int, boxes: list[tuple[str, tuple[int, int, int, int]]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "IRNet-CDA embedded demo"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "1"
    for cls, (x0, y0, x1, y1) in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = cls
        for tag, v in (("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0")):
            ET.SubElement(obj, tag).text = v
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, tag).text = str(v)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _palette_png(label: Array) -> bytes:
    img = Image.fromarray(label)
    img.putpalette(voc_palette().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# the dataset


def _plan(n: int, p_typical: float, rng: np.random.Generator) -> list[tuple[int, str, int | None]]:
    """(primary class, background, second class or None) for ``n`` images.

    Primary classes are balanced; exactly ``round(p_typical * n_c)`` images of each primary class get
    its typical background, so the bias is the configured one and not a sampling accident.
    """
    primaries = rng.permutation(np.resize(np.arange(len(DEMO_CLASSES)), n))
    on_context = np.zeros(n, bool)
    for c in range(len(DEMO_CLASSES)):
        idx = rng.permutation(np.flatnonzero(primaries == c))
        on_context[idx[: round(p_typical * len(idx))]] = True
    plan = []
    for primary, typical in zip(primaries.tolist(), on_context.tolist(), strict=True):
        home = TYPICAL_BACKGROUND[DEMO_CLASSES[primary]]
        background = home if typical else str(rng.choice([b for b in BACKGROUNDS if b != home]))
        # A second class only ever appears in its own typical context, which keeps the bias intact.
        partners = [c for c, name in enumerate(DEMO_CLASSES) if c != primary and TYPICAL_BACKGROUND[name] == background]
        second = int(rng.choice(partners)) if partners and rng.random() < P_SECOND_CLASS else None
        plan.append((primary, background, second))
    return plan


def _params(seed: int, n_train_aug: int, n_train: int, n_val: int, p_typical: float) -> dict:
    return {
        "generator": "voc12.demo",
        "version": FORMAT_VERSION,
        "seed": seed,
        "n_train_aug": n_train_aug,
        "n_train": n_train,
        "n_val": n_val,
        "p_typical": p_typical,
        "classes": list(DEMO_CLASSES),
        "typical_background": TYPICAL_BACKGROUND,
    }


def _is_complete(root: Path, params: dict, lists: list[Path], files: Callable[[str], tuple[Path, ...]]) -> bool:
    """The manifest matches ``params`` and every id of the id ``lists`` has all its ``files(id)``."""
    manifest = root / MANIFEST
    try:
        if json.loads(manifest.read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    ids = [name for path in lists for name in read_id_list(path)]
    return all(p.is_file() for name in ids for p in files(name))


def _refuse_foreign(root: Path, image_dirs: tuple[str, ...], demo_name: str) -> None:
    """Never write demo files into a real dataset that was passed by mistake: without a demo manifest, every
    file in ``image_dirs`` must be named like a demo image (regex ``demo_name``)."""
    if (root / MANIFEST).is_file():
        return
    pattern = re.compile(demo_name)
    for image_dir in image_dirs:
        images = root / image_dir
        if not images.is_dir():
            continue
        with os.scandir(images) as it:
            for entry in it:
                if not pattern.fullmatch(entry.name):
                    raise UserError(
                        f"{root} already holds a dataset ({images / entry.name}) that is not the demo: choose "
                        "another directory for the demo dataset."
                    )


def make_demo_dataset(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    n_train_aug: int = 400,
    n_train: int = 120,
    n_val: int = 120,
    p_typical: float = 0.85,
) -> Path:
    """Write the demo dataset under ``root`` (a no-op when it is already there) and return ``root``.

    Args:
        seed: the same seed and sizes give byte-identical files.
        n_train_aug: training images (CAM/IRN training, CDA object bank).
        n_train: the subset of ``train_aug`` on which CAMs and pseudo masks are evaluated.
        n_val: disjoint images for the final segmentation evaluation.
        p_typical: fraction of the images of each class on its typical background.
    """
    root = Path(root)
    if not 1 <= n_train <= n_train_aug or n_val < 1:
        raise UserError(
            f"demo sizes need 1 <= n_train <= n_train_aug and n_val >= 1, got {n_train_aug, n_train, n_val}"
        )
    if not 0.0 <= p_typical <= 1.0:
        raise UserError(f"p_typical must lie in [0, 1], got {p_typical}")
    params = _params(seed, n_train_aug, n_train, n_val, p_typical)
    layout = VOC12(root)
    points, scribbles = SparseLabels(layout, "points"), SparseLabels(layout, "scribbles")
    lists = [layout.split_list("train_aug"), layout.split_list("val")]
    if _is_complete(root, params, lists, lambda name: (layout.image(name), layout.seg_class(name),
                                                       layout.seg_object(name), layout.annotation(name),
                                                       points.path(name), scribbles.path(name))):
        return root
    _refuse_foreign(root, ("JPEGImages",), rf"{ID_YEAR}_\d{{6}}\.jpg")
    (root / MANIFEST).unlink(missing_ok=True)  # an interrupted regeneration must not look complete
    for d in ("JPEGImages", "SegmentationClass", "SegmentationObject", "Annotations", "ImageSets/Segmentation",
              points.folder, scribbles.folder):
        (root / d).mkdir(parents=True, exist_ok=True)

    plan_rng = np.random.default_rng([seed, 0])
    # train_aug and val are planned separately so each has the configured bias on its own.
    plan = _plan(n_train_aug, p_typical, plan_rng) + _plan(n_val, p_typical, plan_rng)
    ids = [f"{ID_YEAR}_{i:06d}" for i in range(1, len(plan) + 1)]
    train_aug, val = ids[:n_train_aug], ids[n_train_aug:]
    train = sorted(plan_rng.choice(train_aug, size=n_train, replace=False).tolist())

    context = []
    for i, (name, (primary, background, second)) in enumerate(zip(ids, plan, strict=True)):
        classes = [primary] if second is None else [primary, second]
        rng = np.random.default_rng([seed, 1, i])
        rgb, cls_map, inst, boxes = _render(background, classes, rng, _VOC_MASK_VALUES)
        Image.fromarray(rgb).save(layout.image(name), format="JPEG", quality=JPEG_QUALITY)
        layout.seg_class(name).write_bytes(_palette_png(cls_map))
        layout.seg_object(name).write_bytes(_palette_png(inst))
        layout.annotation(name).write_bytes(_annotation_xml(name, *rgb.shape[:2], boxes))
        # Sparse labels from a stream of their own, so the images stay byte-identical to earlier versions.
        sparse_rng = np.random.default_rng([seed, 2, i])
        points.path(name).write_bytes(_palette_png(generate_clicks(cls_map, layout.num_labels, sparse_rng,
                                                                   per_class=DEMO_CLICKS)))
        scribbles.path(name).write_bytes(_palette_png(generate_scribbles(cls_map, layout.num_labels, sparse_rng)))
        context.append(f"{name}\t{background}\n")
    for split, split_ids in (("train_aug", train_aug), ("train", train), ("val", val)):
        layout.split_list(split).write_text("".join(f"{i}\n" for i in split_ids))
    (root / CONTEXT_FILE).write_text("".join(context))
    save_json(root / MANIFEST, params)
    return root


def make_demo_coco(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 400,
    n_val: int = 120,
    p_typical: float = 0.85,
) -> Path:
    """Write the demo in the COCO 2014 layout (``dataset.coco14``) under ``root`` (a no-op when it is already
    there) and return ``root``.

    The same drawings, backgrounds and context bias as ``make_demo_dataset``, each shape labelled with the COCO
    class ``COCO_CLASS_OF_SHAPE`` gives it, so mask values above 20 (teddy bear 78, elephant 21) run through
    the pipeline:

    ==========  ==========  ==========
    shape       COCO class  mask value
    ==========  ==========  ==========
    aeroplane   airplane    5
    bird        bird        15
    boat        boat        9
    car         truck       8
    cat         teddy bear  78
    cow         elephant    21
    sheep       sheep       19
    train       train       7
    ==========  ==========  ==========

    Files: ``train2014/COCO_train2014_<n>.jpg``, ``val2014/COCO_val2014_<n>.jpg`` with ``<n>`` = 12 digits
    from ``COCO_ID_BASE + 1`` on (train first, then val; never a real COCO number), palette PNG masks
    ``SegmentationClass/{train2014,val2014}/<id>.png`` (0 background, class ``c`` as ``c + 1``, a 255 void band
    on every object boundary), ``ImageSets/{train,val}.txt`` and ``demo_manifest.json``. No instance masks and
    no instances JSON. Plan and images come from ``default_rng([seed, 2])`` and ``default_rng([seed, 3, i])``
    (other streams than the VOC demo's); the same parameters give byte-identical files.

    Args:
        seed: the same seed and sizes give byte-identical files.
        n_train: training images (also the default evaluation list of ``coco14``).
        n_val: disjoint images for the final segmentation evaluation.
        p_typical: fraction of the images of each class on its typical background.
    """
    root = Path(root)
    if n_train < 1 or n_val < 1:
        raise UserError(f"COCO demo sizes need n_train >= 1 and n_val >= 1, got {n_train, n_val}")
    if not 0.0 <= p_typical <= 1.0:
        raise UserError(f"p_typical must lie in [0, 1], got {p_typical}")
    params = {
        "generator": "voc12.demo.coco",
        "version": FORMAT_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "p_typical": p_typical,
        "classes": COCO_CLASS_OF_SHAPE,
        "typical_background": TYPICAL_BACKGROUND,
    }
    layout = COCO14(root)
    lists = {split: root / "ImageSets" / f"{split}.txt" for split in ("train", "val")}
    if _is_complete(root, params, list(lists.values()), lambda name: (layout.image(name), layout.seg_class(name))):
        return root
    _refuse_foreign(root, ("train2014", "val2014"), rf"COCO_(train|val)2014_{ID_YEAR}\d{{8}}\.jpg")
    (root / MANIFEST).unlink(missing_ok=True)  # an interrupted regeneration must not look complete
    for d in ("train2014", "val2014", "SegmentationClass/train2014", "SegmentationClass/val2014", "ImageSets"):
        (root / d).mkdir(parents=True, exist_ok=True)

    plan_rng = np.random.default_rng([seed, 2])
    # train and val are planned separately so each has the configured bias on its own.
    plan = _plan(n_train, p_typical, plan_rng) + _plan(n_val, p_typical, plan_rng)
    ids = [f"COCO_{'train' if i <= n_train else 'val'}2014_{COCO_ID_BASE + i:012d}" for i in range(1, len(plan) + 1)]
    for i, (name, (primary, background, second)) in enumerate(zip(ids, plan, strict=True)):
        classes = [primary] if second is None else [primary, second]
        rgb, cls_map, _, _ = _render(background, classes, np.random.default_rng([seed, 3, i]), _COCO_MASK_VALUES)
        Image.fromarray(rgb).save(layout.image(name), format="JPEG", quality=JPEG_QUALITY)
        layout.seg_class(name).write_bytes(_palette_png(cls_map))
    for split, split_ids in (("train", ids[:n_train]), ("val", ids[n_train:])):
        lists[split].write_text("".join(f"{i}\n" for i in split_ids))
    save_json(root / MANIFEST, params)
    return root


def context_bias(root: str | os.PathLike, split: str = "train_aug") -> dict[str, float]:
    """Per demo class: the fraction of the split's images containing it that show its typical background."""
    root = Path(root)
    layout = VOC12(root)
    backgrounds = dict(line.split("\t") for line in (root / CONTEXT_FILE).read_text().splitlines())
    hits = dict.fromkeys(DEMO_CLASSES, 0)
    totals = dict.fromkeys(DEMO_CLASSES, 0)
    for name in read_id_list(layout.split_list(split)):
        tree = ET.parse(layout.annotation(name))
        for cls in {obj.findtext("name") for obj in tree.getroot().iter("object")}:
            totals[cls] += 1
            hits[cls] += backgrounds[name] == TYPICAL_BACKGROUND[cls]
    return {c: hits[c] / totals[c] for c in DEMO_CLASSES if totals[c]}
