"""Pixel-pair index ("PathIndex"), affinity labels and random-walk propagation (spec 7.2, 7.3, 8.2).

Pairs live on the /4 grid. Every source pixel is paired with the destinations ``src + delta`` for the
offsets ``delta`` of a half disc, so each unordered pair within ``radius`` appears once. All pair
quantities are read through one ``F.unfold`` window per source (``r + 1`` rows by ``2r + 1`` columns,
the source at row 0, column ``r``): the path points, destinations and source of a pair are fixed
positions in that window, so no ``(K, n_sources)`` index tensors are stored and a cached
``PathIndex`` costs a few kilobytes whatever the grid size.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from misc.labels import IGNORE


def path_points(dy: int, dx: int) -> np.ndarray:
    """Integer points ``(L, 2)`` ``(y, x)`` of the path from ``(0, 0)`` to ``(dy, dx)`` (spec 7.2).

    All points of the bounding box whose perpendicular distance to the line through both ends is < 1,
    endpoints included; ordered by row, then column.
    """
    ys, xs = np.meshgrid(np.arange(min(0, dy), max(0, dy) + 1), np.arange(min(0, dx), max(0, dx) + 1),
                         indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    keep = (dy * xs - dx * ys) ** 2 < dy * dy + dx * dx
    return np.stack([ys[keep], xs[keep]], axis=1).astype(np.int64)


def path_offsets(radius: int) -> np.ndarray:
    """Half-disc offsets ``(K, 2)`` ``(dy, dx)`` within ``radius`` (152 for 10, 34 for 5).

    ``dy = 0, 1 <= dx < radius`` plus ``1 <= dy < radius`` with ``dx^2 + dy^2 < radius^2``. Sorted
    (stably) by path length so that ``PathIndex`` takes the max over each equal-length group at once;
    this one order is used for labels, affinities and displacement targets alike.
    """
    r = math.ceil(radius) - 1
    offsets = [(0, dx) for dx in range(1, r + 1)]
    offsets += [(dy, dx) for dy in range(1, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx < radius**2]
    offsets.sort(key=lambda d: len(path_points(*d)))
    return np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


class PathIndex:
    """Pair set of spec 7.2 on a ``grid_size = (h, w)`` grid; obtain it through :func:`get_path_index`.

    Sources are rows ``[0, h - r)`` x columns ``[r, w - r)`` (``r = ceil(radius) - 1``) in raster order,
    so every destination ``src + offsets[k]`` is in the grid.
    """

    def __init__(self, radius: int, grid_size: tuple[int, int]) -> None:
        self.radius = radius
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.r = math.ceil(radius) - 1
        h, w = self.grid_size
        self.source_shape = (h - self.r, w - 2 * self.r)
        if min(self.source_shape) <= 0:
            raise ValueError(f"grid {self.grid_size} is too small for radius {radius}")
        self.n_sources = self.source_shape[0] * self.source_shape[1]
        offsets = path_offsets(radius)
        self.offsets = torch.from_numpy(offsets)  # (K, 2) (dy, dx)
        self.window = (self.r + 1, 2 * self.r + 1)
        self.src_position = self.r  # the source's position in its flattened window
        self.dst_positions = torch.from_numpy(self._position(offsets))  # (K,)
        # Paths grouped by length: (length, number of offsets, flattened window positions (n * length,)).
        paths = [path_points(dy, dx) for dy, dx in offsets]
        lengths = [len(p) for p in paths]
        self.path_groups: list[tuple[int, int, Tensor]] = []
        start = 0
        for length in sorted(set(lengths)):
            n = lengths.count(length)
            positions = self._position(np.concatenate(paths[start:start + n]))
            self.path_groups.append((length, n, torch.from_numpy(positions)))
            start += n

    def _position(self, points: np.ndarray) -> np.ndarray:
        """Flattened window position of ``(y, x)`` points relative to the source."""
        return points[:, 0] * self.window[1] + points[:, 1] + self.r

    def windows(self, x: Tensor) -> Tensor:
        """``(B, C, h, w)`` -> ``(B, C, (r + 1) * (2r + 1), n_sources)``: each source's neighbourhood."""
        if tuple(x.shape[-2:]) != self.grid_size:
            raise ValueError(f"map of size {tuple(x.shape[-2:])} given to a PathIndex of grid {self.grid_size}")
        b, c = x.shape[:2]
        return F.unfold(x, self.window).view(b, c, -1, self.n_sources)

    def to_affinity(self, edge: Tensor) -> Tensor:
        """Edge probabilities ``(B, 1, h, w)`` -> pair affinities ``(B, K, n_sources)``, ``1 - max B``
        over each pair's path (differentiable)."""
        win = self.windows(edge)[:, 0]
        maxima = []
        for length, n, positions in self.path_groups:
            points = win.index_select(1, positions.to(win.device))
            maxima.append(points.view(win.shape[0], n, length, -1).amax(dim=2))
        return 1 - torch.cat(maxima, dim=1)

    def src_dst(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Values of ``x (B, C, h, w)`` at the sources ``(B, C, 1, n_sources)`` and at the destinations
        ``(B, C, K, n_sources)``."""
        win = self.windows(x)
        return win[:, :, self.src_position:self.src_position + 1], win.index_select(
            2, self.dst_positions.to(x.device))

    def src_indices(self) -> Tensor:
        """Flat grid indices ``(n_sources,)`` of the sources (raster order)."""
        h, w = self.grid_size
        ys = torch.arange(self.source_shape[0]).view(-1, 1)
        xs = torch.arange(self.r, w - self.r).view(1, -1)
        return (ys * w + xs).reshape(-1)

    def dst_indices(self) -> Tensor:
        """Flat grid indices ``(K, n_sources)`` of the destinations of each offset."""
        step = self.offsets[:, 0] * self.grid_size[1] + self.offsets[:, 1]
        return self.src_indices().view(1, -1) + step.view(-1, 1)


@functools.lru_cache(maxsize=256)
def get_path_index(radius: int, grid_size: tuple[int, int]) -> PathIndex:
    """Cached :class:`PathIndex`: inference meets many grid sizes, and an index is cheap to keep."""
    return PathIndex(radius, grid_size)


def affinity_labels(label: np.ndarray | Tensor, path_index: PathIndex) -> tuple[Tensor, Tensor, Tensor]:
    """IR label map ``(h, w)`` (0 = bg, c + 1 = class c, 255 = ignore) -> ``bg_pos, fg_pos, neg`` float32
    ``(K, n_sources)`` (spec 7.3). A pair counts only if neither label is ``IGNORE``: any number of classes
    (COCO's 80 too) takes part."""
    lab = torch.as_tensor(np.asarray(label)).to(torch.float32)  # labels <= 255 are exact in float32
    src, dst = path_index.src_dst(lab[None, None])
    src, dst = src[0, 0], dst[0, 0]  # (1, n), (K, n)
    valid = (src != IGNORE) & (dst != IGNORE)
    same = src == dst
    bg_pos = valid & same & (src == 0)
    fg_pos = valid & same & (src > 0)
    neg = valid & ~same
    return bg_pos.float(), fg_pos.float(), neg.float()


def random_walk(x: Tensor, edge: Tensor, beta: float = 10, exp_times: int = 8, radius: int = 5) -> Tensor:
    """Propagate maps ``x (n, h, w)`` over the edge map ``edge (h, w)`` (spec 8.2) without a dense matrix.

    Same result as :func:`random_walk_dense`: the pair affinities are ``(1 - max B)^beta`` over each pair's
    path (pairs closer than ``radius``), and the walk of :func:`walk_affinity` runs ``2^exp_times`` steps
    on ``x (1 - B)``.
    """
    _, h, w = x.shape
    r = math.ceil(radius) - 1
    # Padding the edge map with 1.0 makes every pair that leaves the image have affinity exactly 0, so it
    # drops out of A and of the column sums, as the reference's crop of its padded matrix does. Padding
    # by r (not the reference's radius) makes the sources exactly the image pixels, in raster order.
    edge = edge.to(x.dtype)
    padded = F.pad(edge[None, None], (r, r, 0, r), value=1.0)
    pi = get_path_index(radius, (h + r, w + 2 * r))
    aff = pi.to_affinity(padded)[0].pow(beta).view(-1, h, w)  # (K, h, w): A(p, p + offset_k)
    return walk_affinity(x * (1 - edge), aff, pi.offsets, 2**exp_times)


def walk_affinity(x: Tensor, aff: Tensor, offsets: Tensor, steps: int) -> Tensor:
    """``steps`` random-walk steps of maps ``x (n, h, w)`` under pair affinities ``aff (K, h, w)``.

    ``aff[k, p]`` is the affinity of pixel ``p`` with ``p + offsets[k]`` (``offsets (K, 2)`` ``(dy, dx)``,
    a half disc: each unordered pair once), 0 where that neighbour is outside the image. With ``A`` the
    symmetric matrix of these affinities (1 on the diagonal) and ``c = colsum(A)``, the references compute
    ``R . T^steps`` with ``T = A diag(1/c)``, i.e. ``R_j = sum_i R_i A_ij / c_j`` per step: each pixel
    becomes the ``A``-weighted mean of its neighbourhood. We store those ``2K + 1`` weights per pixel and
    apply the step as a weighted gather: O(hw K) memory and O(steps n hw K) work instead of an ``(hw)^2``
    matrix and its squarings. Returns ``(n, h, w)``.
    """
    n, h, w = x.shape
    aff = aff.to(x.dtype).reshape(-1, h * w)
    # Neighbour table over the full disc: self, p + offset_k (weight aff_k(p)) and p - offset_k (weight
    # aff_k(p - offset_k), the same pair seen from its other end).
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    ys, xs = ys.reshape(-1, 1), xs.reshape(-1, 1)
    dy, dx = (t.to(x.device).view(1, -1) for t in offsets.unbind(1))
    fy, fx, by, bx = ys + dy, xs + dx, ys - dy, xs - dx
    f_in = (fy < h) & (fx >= 0) & (fx < w)
    b_in = (by >= 0) & (bx >= 0) & (bx < w)
    here = ys * w + xs  # (hw, 1)
    # Out-of-image neighbours point at the pixel itself with weight 0, so the gather stays in range.
    f_idx = torch.where(f_in, fy * w + fx, here)
    b_idx = torch.where(b_in, by * w + bx, here)
    k = torch.arange(aff.shape[0], device=x.device).view(1, -1)
    f_w = torch.where(f_in, aff.t(), 0)
    b_w = torch.where(b_in, aff[k, b_idx], 0)
    nbr = torch.cat([here, f_idx, b_idx], dim=1)  # (hw, 2K + 1)
    weight = torch.cat([torch.ones_like(here, dtype=x.dtype), f_w, b_w], dim=1)
    weight = weight / weight.sum(dim=1, keepdim=True)  # c_j: the symmetric A's column sum = row sum

    # One step R_j <- sum_k weight[j, k] R[nbr[j, k]] for all n maps at once: embedding_bag is exactly
    # this fused gather + weighted sum (an ELL sparse-matrix product) on CPU and CUDA, without the
    # (n, hw, 2K + 1) intermediate of an explicit gather.
    r_t = x.reshape(n, h * w).t().contiguous()  # (hw, n)
    for _ in range(steps):
        r_t = F.embedding_bag(nbr, r_t, per_sample_weights=weight, mode="sum")
    return r_t.t().reshape(n, h, w)


def random_walk_dense(x: Tensor, edge: Tensor, beta: float = 10, exp_times: int = 8, radius: int = 5) -> Tensor:
    """Reference formulation of spec 8.2 (``(hw)^2`` memory, ``exp_times`` dense squarings): the
    correctness oracle and benchmark baseline for :func:`random_walk`. ``x (n, h, w)``, ``edge (h, w)``
    -> ``(n, h, w)``."""
    n, h, w = x.shape
    edge = edge.to(x.dtype)
    # Pair set on the grid padded as the reference does (radius columns left/right, radius rows bottom).
    hp, wp = h + radius, w + 2 * radius
    pi = get_path_index(radius, (hp, wp))
    aff = pi.to_affinity(F.pad(edge[None, None], (radius, radius, 0, radius), value=1.0))[0]
    src = pi.src_indices().to(x.device).expand_as(aff)
    dst = pi.dst_indices().to(x.device)
    # Crop to the image: keep pairs with both ends inside, renumbered on the h x w grid. This equals
    # building the padded matrix and slicing it, without materialising the padded matrix.
    sy, sx = src // wp, src % wp - radius
    ty, tx = dst // wp, dst % wp - radius
    keep = (sy < h) & (sx >= 0) & (sx < w) & (ty < h) & (tx >= 0) & (tx < w)
    s, t, a = (sy * w + sx)[keep], (ty * w + tx)[keep], aff[keep]
    dense = torch.zeros(h * w, h * w, dtype=x.dtype, device=x.device)
    dense[s, t] = a
    dense[t, s] = a
    dense.fill_diagonal_(1.0)

    trans = dense.pow_(beta)
    trans /= trans.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        trans = trans @ trans
    return ((x * (1 - edge)).reshape(n, h * w) @ trans).view(n, h, w)
