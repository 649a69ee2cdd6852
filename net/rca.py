"""RCA (Regional Semantic Contrast and Aggregation, Zhou et al., CVPR 2022; spec rca.md): the network, the
regional memory bank, the contrast loss with region mix-up, and the online accumulated maps.

The network reads the backbone's last level ``X = tap(4)`` (``D`` channels; VGG-16's conv5_3 at output
stride 8 in the paper) and has four parts (spec 4):

- the **coarse head** ``H_c`` (3 x [3x3 conv, ReLU], 1x1 conv to the C classes) whose softmax gives each
  class's region mask (spec 5.2);
- the **embedding head** ``E`` (3x3 conv, BN, ReLU, 3x3 conv back to ``D``), the contrast loss's queries;
- the **aggregation**: every pixel of ``X`` attends to the memory's ``C x K`` k-means centroids (unnormalised
  by default, spec 4.3), the result concatenated to ``X`` and projected back to ``D``;
- the **refined head** ``H_r``: C class-specific branches (3 x [3x3 conv, ReLU], 1x1 conv to one map) on the
  aggregated features, run as one grouped convolution (the same function as C separate branches; spec 10
  #10 suggests it). Its maps give the logits (GAP) and the localization maps.

``head_width`` is the heads' hidden width (the paper's 512; a CPU demo uses less); every new convolution starts
from N(0, 0.01) at the paper's widths, its standard deviation scaled by ``sqrt(paper inputs / inputs)`` at
others (the same per-layer gain; 0.01 in a 32-wide head would leave the maps equal to their biases). The memory bank
(:class:`MemoryBank`) and the accumulated maps (:class:`AccumulatedMaps`) are buffers of the network, so the
training checkpoint and the final weights hold them: a resumed run continues with the same bank, pointers,
centroids and maps.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from misc import dist
from net.backbone import Backbone

MEMORY_UPDATES: tuple[str, ...] = ("ema", "replace")
MEMORY_FEATURES: tuple[str, ...] = ("backbone", "embed")
# scikit-learn's KMeans defaults of the reference's time (spec 5.4): k-means++ init, 10 runs, 300 Lloyd
# iterations, tolerance 1e-4 of the data's mean variance.
KMEANS_RUNS, KMEANS_ITERS, KMEANS_TOL = 10, 300, 1e-4
# The reference's feature and head width (VGG-16's conv5) and its convolutions' initial standard deviation.
PAPER_WIDTH, INIT_STD = 512, 0.01


@dataclass(frozen=True)
class RCAConfig:
    """RCA's hyperparameters; the defaults are the reference's (spec 12)."""

    head_width: int = 512
    queue_length: int = 500
    centroids: int = 10
    memory_momentum: float = 0.99
    memory_update: str = "ema"
    memory_feature: str = "backbone"
    enqueue_threshold: float = 0.7
    accumulate_threshold: float = 0.1
    tau: float = 0.07
    mixup_beta: float = 8.0
    coarse_weight: float = 0.4
    contrast_weight: float = 0.01
    contrast_from_epoch: int = 2
    contrast_scale: float = 2.0
    agg_softmax: bool = False
    seed: int = 0


# ------------------------------------------------------------------------------------------ regions


@torch.no_grad()
def region_masks(coarse: Tensor) -> Tensor:
    """Each class's region (spec 5.2) from the coarse maps ``(B, C, h, w)``: bool ``(B, C, h, w)``, true where the
    class's softmax score (over the C channels) exceeds its mean over the image's pixels."""
    soft = coarse.float().softmax(1)
    return soft > soft.mean((2, 3), keepdim=True)


def masked_means(feats: Tensor, masks: Tensor) -> Tensor:
    """``feats (B, D, h, w)``, ``masks (B, C, h, w)`` -> ``(B, C, D)``: each class's mean of the *original*
    features over its mask (the reference overwrote the features with each masked copy, so a second class of
    an image averaged features already zeroed outside the first's region: spec 5.5, fixed). An empty mask
    gives the zero vector."""
    weights = masks.flatten(2).to(feats.dtype)
    sums = torch.einsum("bdn,bcn->bcd", feats.flatten(2), weights)
    return sums / weights.sum(2, keepdim=True).clamp_min(1)


# ------------------------------------------------------------------------------------------- k-means


def _seeded_generator(*identity: object) -> torch.Generator:
    """A CPU generator seeded by a hash of ``identity`` (the run's seed, a purpose, an epoch)."""
    digest = hashlib.sha256(json.dumps(identity).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _sq_distances(x: Tensor, x_sq: Tensor, centers: Tensor) -> Tensor:
    """``x (G, n, D)`` with its squared norms ``x_sq (G, n, 1)``, ``centers (G, k, D)`` -> squared Euclidean
    distances ``(G, n, k)``, clamped at 0 (rounding)."""
    cross = torch.baddbmm(centers.pow(2).sum(2)[:, None], x, centers.transpose(1, 2), alpha=-2)
    return (cross + x_sq).clamp_min(0)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding of each of the ``G`` point sets ``x (G, n, D)`` (scikit-learn's: ``2 + ln k``
    candidates per centre, the one that lowers the potential most kept) -> ``(G, k, D)``. Random draws come
    from the CPU ``generator``, so any device draws the same."""
    g, n, d = x.shape
    trials = 2 + int(math.log(k))
    groups = torch.arange(g, device=x.device)
    x_sq = x.pow(2).sum(2, keepdim=True)
    first = torch.randint(n, (g,), generator=generator).to(x.device)
    centers = [x[groups, first]]
    closest = _sq_distances(x, x_sq, centers[0][:, None])[..., 0]
    for _ in range(1, k):
        draws = torch.rand(g, trials, generator=generator, dtype=torch.float64).to(x.device)
        draws = draws * closest.double().sum(1, keepdim=True)
        candidates = torch.searchsorted(closest.double().cumsum(1), draws).clamp_max(n - 1)
        points = x.gather(1, candidates[..., None].expand(-1, -1, d))
        dist_to = torch.minimum(closest[:, None], _sq_distances(x, x_sq, points).transpose(1, 2))
        best = dist_to.sum(2).argmin(1)
        closest = dist_to[groups, best]
        centers.append(points[groups, best])
    return torch.stack(centers, 1)


def kmeans(x: Tensor, k: int, generator: torch.Generator, runs: int = KMEANS_RUNS, iters: int = KMEANS_ITERS,
           tol: float = KMEANS_TOL) -> Tensor:
    """k-means of each of the ``G`` point sets ``x (G, n, D)``, ``n >= k`` (Lloyd from k-means++, the best of
    ``runs`` by inertia) -> centres ``(G, k, D)``; the sets are clustered together but independently.

    A set stops when its centres move less (summed squared shift) than ``tol`` times its mean per-feature
    variance, as scikit-learn's ``KMeans``. A cluster left empty takes the point farthest from its centre
    (scikit-learn relocates them the same way).
    """
    x = x.float()
    g, _, d = x.shape
    x_sq = x.pow(2).sum(2, keepdim=True)
    threshold = tol * x.var(1, unbiased=False).mean(1)
    best = x.new_zeros(g, k, d)
    best_inertia = torch.full((g,), math.inf, device=x.device)
    for _ in range(runs):
        centers = kmeans_plus_plus(x, k, generator)
        active = torch.ones(g, dtype=torch.bool, device=x.device)
        previous = None
        for _ in range(iters):
            dists = _sq_distances(x, x_sq, centers)
            assign = dists.argmin(2)
            if previous is not None:
                # Assignments that did not change are a fixed point (scikit-learn's strict convergence).
                active &= (assign != previous).any(1)
                if not active.any():
                    break
            previous = assign
            one_hot = F.one_hot(assign, k).to(x.dtype)
            counts = one_hot.sum(1)
            new = (one_hot.transpose(1, 2) @ x) / counts.clamp_min(1)[..., None]
            for group in (counts == 0).any(1).nonzero()[:, 0].tolist():
                empty = (counts[group] == 0).nonzero()[:, 0]
                far = dists[group].gather(1, assign[group][:, None])[:, 0].argsort(descending=True)[: len(empty)]
                new[group, empty] = x[group, far]
            new = torch.where(active[:, None, None], new, centers)
            active &= (new - centers).pow(2).sum((1, 2)) > threshold
            centers = new
            if not active.any():
                break
        inertia = _sq_distances(x, x_sq, centers).amin(2).sum(1)
        better = inertia < best_inertia
        best[better], best_inertia[better] = centers[better], inertia[better]
    return best


# --------------------------------------------------------------------------------------------- memory


class MemoryBank(nn.Module):
    """Per-class queues of region features and their k-means centroids (spec 5.1).

    Buffers: ``queue (C, L, D)`` and ``centroids (C, K, D)``, both N(0, 1) at first; ``ptr (C,)`` each queue's next
    slot; ``writes (C,)`` how many vectors each class has received in all; ``centroid_epoch`` the epoch whose
    first step last clustered the queues (-1: never, the random centroids of epoch 0). A class nothing was
    written to keeps its random entries: its centroids are noise (``methods.rca`` warns).
    """

    def __init__(self, num_classes: int, length: int, dim: int, centroids: int) -> None:
        super().__init__()
        if length < centroids:
            raise ValueError(f"a queue of {length} entries cannot give {centroids} centroids")
        self.register_buffer("queue", torch.randn(num_classes, length, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("writes", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("centroids", torch.randn(num_classes, centroids, dim))
        self.register_buffer("centroid_epoch", torch.tensor(-1))

    @torch.no_grad()
    def write(self, classes: Tensor, vectors: Tensor, momentum: float, update: str = "ema") -> None:
        """Enqueue ``vectors (n, D)`` of ``classes (n,)`` in order: each goes to its class's next slot (``ptr``
        advances modulo the length), as an EMA ``m * old + (1 - m) * new`` (``ema``, the reference's, spec 5.3)
        or replacing the slot (``replace``, a FIFO queue). A class may receive at most ``L`` vectors per call."""
        if update not in MEMORY_UPDATES:
            raise ValueError(f"memory update must be one of {MEMORY_UPDATES}, got {update!r}")
        if not len(classes):
            return
        num_classes, length = self.queue.shape[:2]
        one_hot = F.one_hot(classes, num_classes)
        if one_hot.sum(0).max() > length:
            raise ValueError(f"more than {length} memory writes of one class in one step")
        # The k-th write of a class in this call goes k slots after its pointer.
        rank = (one_hot.cumsum(0) - 1).gather(1, classes[:, None])[:, 0]
        slots = (self.ptr[classes] + rank) % length
        vectors = vectors.to(self.queue.dtype)
        if update == "ema":
            vectors = momentum * self.queue[classes, slots] + (1 - momentum) * vectors
        self.queue[classes, slots] = vectors
        self.ptr.add_(one_hot.sum(0)).remainder_(length)
        self.writes.add_(one_hot.sum(0))

    @torch.no_grad()
    def refresh_centroids(self, epoch: int, seed: int) -> None:
        """Cluster every class's queue into its centroids (spec 5.4). The draws are seeded by ``(seed, epoch)``,
        and under DDP rank 0's result is broadcast, so the centroids are the same on every rank and in a run
        resumed at this epoch."""
        self.centroids.copy_(kmeans(self.queue, self.centroids.shape[1], _seeded_generator(seed, "rca_kmeans", epoch)))
        dist.broadcast_(self.centroids)
        self.centroid_epoch.fill_(epoch)

    def keys(self) -> Tensor:
        """The contrast loss's keys: every entry L2-normalised, detached, ``(C, L, D)``."""
        return F.normalize(self.queue.detach().float(), dim=2)


def class_infonce(q: Tensor, keys: Tensor, tau: float) -> Tensor:
    """Per-class InfoNCE of queries against the memory (spec 6.2 steps 4-5): ``q (P, D)`` unit queries, ``keys
    (C, L, D)`` unit entries -> ``(P, C)``: ``L_a`` for every class ``a``, the mean over the L keys ``k`` of
    class ``a`` of ``-[l_k - log(N_a + exp(l_k))]``, with ``l = q . m / tau`` shifted by its (detached) max over
    all ``C L`` entries and ``N_a`` the sum of ``exp(l)`` over the entries of every other class."""
    logits = torch.einsum("pd,cld->pcl", q, keys) / tau
    logits = logits - logits.flatten(1).amax(1)[:, None, None].detach()
    e = logits.exp()
    per_class = e.sum(2)
    others = per_class.sum(1, keepdim=True) - per_class
    loss = -(logits - (others[:, :, None] + e).clamp_min(1e-4).log())
    return loss.mean(2)


def contrast_loss(embed: Tensor, masks: Tensor, labels: Tensor, keys: Tensor, tau: float, beta: float) -> Tensor:
    """RCA's semantic contrast with region mix-up (spec 6.2), before ``contrast_scale``: a scalar.

    ``embed (B, D, h, w)`` (the embedding head's ``Z``, with gradient), ``masks (B, C, h, w)`` the regions,
    ``labels (B, C)`` multi-hot, ``keys (C, L, D)`` the memory's. For each positive (image ``i``, class ``c``):
    the partner image ``j = perm(i)`` (one permutation per call, ``j`` may be ``i``) and a random positive class
    ``c'`` of ``j``, ``lambda ~ Beta(beta, beta)``, the query ``q = normalise(lambda u_ic + (1 - lambda) u_jc')``
    from the regions' mean embeddings, and ``lambda L_c + (1 - lambda) L_c'`` (:func:`class_infonce`). The loss is
    the mean over images of each image's mean over its classes (an image without a class counts for nothing;
    a partner without one lends the image itself). Random draws: torch's global generator.
    """
    b = embed.shape[0]
    pos = labels > 0.5
    regions = masked_means(embed.float(), masks)
    perm = torch.randperm(b, device=embed.device)
    image, cls = pos.nonzero(as_tuple=True)
    if not len(image):
        return regions.sum() * 0  # no class in the batch: nothing to contrast, still part of the graph
    partner = perm[image]
    partner_classes = pos[partner]
    alone = partner_classes.sum(1) == 0
    partner = torch.where(alone, image, partner)
    partner_classes = pos[partner]
    # The (pick + 1)-th positive class of the partner: the number of classes whose running count is <= pick.
    counts = partner_classes.sum(1)
    pick = (torch.rand(len(image), device=embed.device) * counts).floor().long()
    partner_cls = (partner_classes.long().cumsum(1) <= pick[:, None]).sum(1)
    lam = torch.distributions.Beta(beta, beta).sample((len(image),)).to(embed.device)
    mixed = lam[:, None] * regions[image, cls] + (1 - lam[:, None]) * regions[partner, partner_cls]
    per_class = class_infonce(F.normalize(mixed, dim=1), keys, tau)
    rows = torch.arange(len(image), device=embed.device)
    pair_loss = lam * per_class[rows, cls] + (1 - lam) * per_class[rows, partner_cls]
    per_image = torch.zeros(b, device=embed.device).index_add_(0, image, pair_loss)
    classes = pos.sum(1)
    has = classes > 0
    return (per_image[has] / classes[has]).mean()


# ------------------------------------------------------------------------------------ accumulated maps


class AccumulatedMaps(nn.Module):
    """The online localization maps (spec 8), one uint8 ``(h, w)`` map per (image, labelled class), keyed by
    image id (the reference keyed them by loader position, which forbade shuffling: spec 10 #1, fixed).

    ``ids``: the training list, ``labels (N, C)`` its multi-hot labels. Buffers: ``pairs (P, 2)`` the (image
    index, class) of each map, image-major with ascending classes; ``maps (P, h, w)`` uint8; ``stored (P,)``.
    """

    def __init__(self, ids: Sequence[str], labels: Tensor, grid: tuple[int, int]) -> None:
        super().__init__()
        image, cls = (labels > 0.5).nonzero(as_tuple=True)
        self.ids = list(ids)
        self.index = {image_id: n for n, image_id in enumerate(self.ids)}
        self.register_buffer("pairs", torch.stack([image, cls], 1))
        self.register_buffer("maps", torch.zeros(len(image), *grid, dtype=torch.uint8))
        self.register_buffer("stored", torch.zeros(len(image), dtype=torch.bool))
        # Row of each (image, class), -1 where the class is not in the image's label.
        self.rows = torch.full(tuple(labels.shape), -1, dtype=torch.long)
        self.rows[image, cls] = torch.arange(len(image))

    def rows_of(self, ids: Sequence[str]) -> Tensor:
        """``(B, C)`` map rows of the images ``ids`` (-1: not a labelled class); CPU."""
        return self.rows[[self.index[i] for i in ids]]

    @torch.no_grad()
    def update(self, rows: Tensor, maps: Tensor, probs: Tensor, epoch: int, last_epoch: int,
               threshold: float = 0.1) -> None:
        """Fold one step's maps into the store (spec 8): ``rows (n,)`` distinct, ``maps (n, h, w)`` the refined
        head's maps of those (image, class) pairs, ``probs (n,)`` their class probabilities.

        From epoch 1 on, a map ``a = round(255 ReLU(m) / (max ReLU(m) + 1e-8))`` is stored where nothing is yet
        and ``p >= threshold``, else max-merged where ``p >= threshold``; in the last epoch a pair with nothing
        stored takes ``a`` whatever ``p`` (so every pair ends with a map).
        """
        if epoch < 1 or not len(rows):
            return
        m = F.relu(maps.float())
        a = (255 * m / (m.flatten(1).amax(1)[:, None, None] + 1e-8)).round().to(torch.uint8)
        rows = rows.to(self.maps.device)
        stored = self.stored[rows]
        confident = probs.to(self.maps.device) >= threshold
        fresh = ~stored & (confident | (epoch == last_epoch))
        merge = stored & confident
        self.maps[rows[fresh]] = a[fresh]
        self.maps[rows[merge]] = torch.maximum(self.maps[rows[merge]], a[merge])
        self.stored[rows[fresh]] = True

    def image_maps(self, image_id: str) -> tuple[Tensor, Tensor]:
        """``(keys (k,) 0-based classes ascending, maps (k, h, w) float in [0, 1])`` of one image; a pair
        never stored (a run of one epoch) is a zero map."""
        rows = self.rows[self.index[image_id]]
        keys = (rows >= 0).nonzero()[:, 0]
        return keys, self.maps[rows[keys].to(self.maps.device)].float() / 255


# -------------------------------------------------------------------------------------------- network


def _conv(in_ch: int, out_ch: int, kernel: int = 3, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups)


class Aggregation(nn.Module):
    """Semantic aggregation (spec 4.3): ``X' = Proj(cat[X, Ag(S V)])`` with ``S = (Q X)(K P)^T * scale`` over the
    centroids ``P`` (detached), unnormalised as the reference; ``softmax``: ``S = softmax((Q X)(K P)^T / sqrt(D))``
    instead (``rca.agg_softmax``, not the reference's)."""

    def __init__(self, dim: int, scale: float, softmax: bool = False) -> None:
        super().__init__()
        self.query = nn.Conv2d(dim, dim, 1)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.agg = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(2 * dim, dim, 1)
        self.scale = scale
        self.softmax = softmax

    def forward(self, x: Tensor, centroids: Tensor) -> Tensor:
        """``x (B, D, h, w)``, ``centroids (M, D)`` -> ``(B, D, h, w)``. fp32 whatever autocast says: the
        unnormalised attention sums M products of D-dimensional dot products."""
        b, d, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            q = self.query(x).flatten(2).transpose(1, 2)
            p = centroids.detach().float()
            s = q @ self.key(p).T
            s = (s / math.sqrt(d)).softmax(-1) if self.softmax else s * self.scale
            a = (s @ self.value(p)).transpose(1, 2).reshape(b, d, h, w)
            return self.proj(torch.cat([x, self.agg(a)], 1))


class RCANet(nn.Module):
    """RCA's classifier (module docstring) with its memory bank and accumulated maps.

    ``forward(x)`` gives the refined logits ``s_r (B, C)`` (the CAM-method contract); ``forward(x, maps=True)``
    the training outputs. ``ids`` / ``labels (N, C)``: the training list the maps are kept for; ``grid``: the
    ``(h, w)`` of level 4 for the training input size. ``set_schedule`` tells the network its epoch length,
    so the losses know the epoch from the step count (``steps_done``, a buffer, in every checkpoint).
    """

    def __init__(self, backbone: Backbone, num_classes: int, config: RCAConfig, ids: Sequence[str], labels: Tensor,
                 grid: tuple[int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.config = config
        dim, width = backbone.channels[4], config.head_width
        self.coarse_head = nn.Sequential(_conv(dim, width), nn.ReLU(inplace=True), _conv(width, width),
                                         nn.ReLU(inplace=True), _conv(width, width), nn.ReLU(inplace=True),
                                         _conv(width, num_classes, 1))
        self.embed_head = nn.Sequential(_conv(dim, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                        _conv(width, dim))
        wide = num_classes * width
        self.refined_head = nn.Sequential(_conv(dim, wide), nn.ReLU(inplace=True),
                                          _conv(wide, wide, groups=num_classes), nn.ReLU(inplace=True),
                                          _conv(wide, wide, groups=num_classes), nn.ReLU(inplace=True),
                                          _conv(wide, num_classes, 1, groups=num_classes))
        self.aggregation = Aggregation(dim, num_classes / config.centroids, config.agg_softmax)
        # Every new convolution's weight ~ N(0, 0.01), biases PyTorch's default (spec 4.2); the backbone keeps
        # its own initialisation or ImageNet weights. At other widths than the paper's (D = W = 512) the
        # standard deviation scales with 1 / sqrt(input channels), so each layer keeps the paper's gain: with
        # 0.01 a narrow head (W = 32: gain 0.17 per layer) would start with maps equal to their biases.
        ours = {id(m) for m in backbone.modules()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in ours:
                paper_in = PAPER_WIDTH * (2 if m is self.aggregation.proj else 1)
                nn.init.normal_(m.weight, 0, INIT_STD * math.sqrt(paper_in / (m.in_channels // m.groups)))
        self.memory = MemoryBank(num_classes, config.queue_length, dim, config.centroids)
        self.accumulated = AccumulatedMaps(ids, labels, grid)
        self.register_buffer("steps_done", torch.tensor(0))
        self.steps_per_epoch, self.epochs = 1, 1

    def set_schedule(self, steps_per_epoch: int, epochs: int) -> None:
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs

    @property
    def epoch(self) -> int:
        """The epoch of the next training step."""
        return int(self.steps_done) // self.steps_per_epoch

    def extra_modules(self) -> list[nn.Module]:
        """The heads the reference names ``extra`` (10x / 20x learning rates, spec 7)."""
        return [self.coarse_head, self.refined_head, self.embed_head]

    def param_groups(self) -> tuple[list[nn.Parameter], ...]:
        """(other weights, other biases, ``extra`` weights, ``extra`` biases): the 1x, 2x, 10x, 20x groups of
        spec 7 (the aggregation layers train at the backbone's rates, as the reference)."""
        extra = {id(p) for m in self.extra_modules() for p in m.parameters()}
        groups: tuple[list[nn.Parameter], ...] = ([], [], [], [])
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[2 * (id(p) in extra) + name.endswith("bias")].append(p)
        return groups

    def features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``X (B, D, h, w)``, the backbone's level-4 feature."""
        return self.backbone.tap(4, self.backbone(x)[4])

    def refined_maps(self, feats: Tensor) -> Tensor:
        """``X (B, D, h, w)`` -> the refined head's class maps ``M_r (B, C, h, w)`` (through the aggregation)."""
        return self.refined_head(self.aggregation(feats, self.memory.centroids.flatten(0, 1)))

    def forward(self, x: Tensor, maps: bool = False) -> Tensor | dict[str, Tensor]:
        """``x (B, 3, H, W)`` normalised. ``maps=False``: ``s_r (B, C)``. ``maps=True``: ``{"features": X (B, D,
        h, w), "coarse": M_c (B, C, h, w), "refined": M_r (B, C, h, w), "embed": Z (B, D, h, w)}``."""
        feats = self.features(x)
        refined = self.refined_maps(feats)
        if not maps:
            return refined.mean((2, 3))
        return {"features": feats, "coarse": self.coarse_head(feats), "refined": refined,
                "embed": self.embed_head(feats)}
