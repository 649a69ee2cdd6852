"""PathIndex, affinity labels and the sparse random walk against brute force and the dense oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from misc.indexing import (
    PathIndex,
    affinity_labels,
    get_path_index,
    path_offsets,
    path_points,
    random_walk,
    random_walk_dense,
)


@pytest.mark.parametrize(("radius", "count"), [(10, 152), (5, 34), (2, 4)])
def test_offset_count_and_half_disc(radius: int, count: int) -> None:
    offsets = [tuple(o) for o in path_offsets(radius).tolist()]
    assert len(offsets) == count == len(set(offsets))
    # Half disc: with the negatives and the origin the offsets tile the full disc exactly once.
    disc = {(y, x) for y in range(-radius, radius + 1) for x in range(-radius, radius + 1)
            if math.hypot(y, x) < radius}
    full = set(offsets) | {(-y, -x) for y, x in offsets} | {(0, 0)}
    assert full == disc and len(disc) == 2 * count + 1
    lengths = [len(path_points(*o)) for o in offsets]
    assert lengths == sorted(lengths)


def test_path_points_match_brute_force() -> None:
    lengths = []
    for dy, dx in path_offsets(10).tolist():
        expected = set()
        for y in range(-12, 13):
            for x in range(-12, 13):
                in_box = min(0, dy) <= y <= max(0, dy) and min(0, dx) <= x <= max(0, dx)
                # Distance to the line through (0, 0) and (dy, dx) via the projection's residual.
                t = (y * dy + x * dx) / (dy * dy + dx * dx)
                if in_box and math.hypot(y - t * dy, x - t * dx) < 1 - 1e-9:
                    expected.add((y, x))
        got = [tuple(p) for p in path_points(dy, dx).tolist()]
        assert len(got) == len(set(got)) and set(got) == expected, (dy, dx)
        assert (0, 0) in expected and (dy, dx) in expected
        lengths.append(len(got))
    assert (min(lengths), max(lengths)) == (2, 22)


def test_path_index_sources_and_pairs() -> None:
    pi = get_path_index(10, (128, 128))
    assert pi.n_sources == 119 * 110 == 13090
    assert get_path_index(10, (128, 128)) is pi  # cached

    pi = PathIndex(3, (9, 11))
    x = torch.randn(2, 3, 9, 11)
    src, dst = pi.src_dst(x)
    flat = x.flatten(2)
    assert torch.equal(src[:, :, 0], flat[:, :, pi.src_indices()])
    assert torch.equal(dst, flat[:, :, pi.dst_indices()])
    assert int(pi.dst_indices().max()) < 9 * 11

    edge = torch.rand(2, 1, 9, 11)
    aff = pi.to_affinity(edge)
    srcs = pi.src_indices().tolist()
    for k, (dy, dx) in enumerate(pi.offsets.tolist()):
        for j in (0, 7, len(srcs) - 1):
            y0, x0 = divmod(srcs[j], 11)
            m = max(float(edge[1, 0, y0 + py, x0 + px]) for py, px in path_points(dy, dx).tolist())
            assert float(aff[1, k, j]) == pytest.approx(1 - m)
    with pytest.raises(ValueError):
        pi.to_affinity(torch.rand(1, 1, 10, 11))


def test_affinity_labels_hand_counted() -> None:
    # Left half background, right half class 1, bottom row ignored. Radius 2: offsets (0,1), (1,-1),
    # (1,0), (1,1); sources rows 0..4 x cols 1..4 (20 sources, 80 pairs; 12 reach the ignored row).
    label = np.zeros((6, 6), np.uint8)
    label[:, 3:] = 1
    label[5] = 255
    pi = PathIndex(2, (6, 6))
    bg, fg, neg = affinity_labels(label, pi)
    assert bg.shape == fg.shape == neg.shape == (4, 20) and bg.dtype == torch.float32
    per_offset = {(0, 1): (5, 10, 5), (1, -1): (8, 4, 4), (1, 0): (8, 8, 0), (1, 1): (4, 8, 4)}
    for k, off in enumerate(pi.offsets.tolist()):
        assert (bg[k].sum(), fg[k].sum(), neg[k].sum()) == per_offset[tuple(off)], off
    assert (bg.sum(), fg.sum(), neg.sum()) == (25, 30, 13)
    assert float((bg + fg + neg).max()) == 1  # the three sets are disjoint


def test_affinity_labels_classes_and_ignore() -> None:
    rng = np.random.default_rng(0)
    # 78: a COCO class (teddy bear); a pair of it must count like any other class's (once only < 21 did).
    label = rng.choice(np.array([0, 3, 78, 255], np.uint8), size=(10, 12))
    pi = PathIndex(4, (10, 12))
    bg, fg, neg = affinity_labels(torch.from_numpy(label), pi)
    flat = label.reshape(-1)
    for k in range(len(pi.offsets)):
        for j, (s, d) in enumerate(zip(pi.src_indices().tolist(), pi.dst_indices()[k].tolist(), strict=True)):
            a, b = int(flat[s]), int(flat[d])
            valid = a != 255 and b != 255
            assert bg[k, j] == (valid and a == b == 0)
            assert fg[k, j] == (valid and a == b and a > 0)
            assert neg[k, j] == (valid and a != b)
    assert fg[:, label.reshape(-1)[pi.src_indices().numpy()] == 78].sum() > 0


@pytest.mark.parametrize(("h", "w", "exp_times"), [(7, 9, 8), (12, 10, 8), (12, 10, 3), (2, 3, 8), (1, 1, 2)])
def test_random_walk_matches_dense(h: int, w: int, exp_times: int) -> None:
    gen = torch.Generator().manual_seed(h * 100 + w + exp_times)
    x = torch.rand(3, h, w, generator=gen, dtype=torch.float64)
    edge = torch.rand(h, w, generator=gen, dtype=torch.float64) ** 2
    exact = random_walk_dense(x, edge, beta=10, exp_times=exp_times)
    # Same mathematics: in float64 the two formulations agree to rounding.
    torch.testing.assert_close(random_walk(x, edge, beta=10, exp_times=exp_times), exact, rtol=1e-9, atol=1e-12)

    # float32: 2^exp_times sequential weighted sums accumulate ~1e-4 relative error (a little more than
    # the dense fp32 squarings, ~1e-4 themselves), measured against the float64 result.
    sparse = random_walk(x.float(), edge.float(), beta=10, exp_times=exp_times)
    dense = random_walk_dense(x.float(), edge.float(), beta=10, exp_times=exp_times)
    assert sparse.shape == (3, h, w) and sparse.dtype == torch.float32
    scale = float(exact.abs().max())
    for approx in (sparse, dense):
        torch.testing.assert_close(approx.double(), exact, rtol=1e-3, atol=2e-4 * scale)
    torch.testing.assert_close(sparse, dense, rtol=1e-3, atol=2e-4 * scale)
    assert float(sparse.min()) >= 0


def test_random_walk_spreads_a_delta_smoothly() -> None:
    x = torch.zeros(2, 9, 9)
    x[0, 4, 4] = 1.0
    x[1] = 0.5  # a constant map stays constant: every step is a weighted mean
    out = random_walk(x, torch.zeros(9, 9), beta=10, exp_times=8)
    torch.testing.assert_close(out[1], torch.full((9, 9), 0.5))
    spread = out[0]
    assert float(spread.min()) > 0 and float(spread.max()) < 1
    # The walk is symmetric, so a centred delta stays symmetric.
    for view in (spread.flip(0), spread.flip(1), spread.t()):
        torch.testing.assert_close(view, spread)
    # And smooth: after 256 steps neighbouring values differ by little.
    assert float((spread[:, 1:] - spread[:, :-1]).abs().max()) < 0.1 * float(spread.max())


def test_random_walk_blocked_by_edges() -> None:
    # A full-strength vertical edge cuts the grid: no mass crosses it.
    x = torch.zeros(1, 8, 12)
    x[0, :, :3] = 1.0
    edge = torch.zeros(8, 12)
    edge[:, 6] = 1.0
    out = random_walk(x, edge, exp_times=6)
    assert float(out[0, :, 6:].abs().max()) == 0
    assert float(out[0, :, :6].min()) > 0
