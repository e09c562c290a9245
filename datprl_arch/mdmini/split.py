"""The split of MD-Mini: whole source images (or disjoint regions of one) go to test, val or train, never to two.

Held-out images are blocks of :func:`held_out_side` pixels cut from the test and val units (at most
:data:`MAX_BLOCKS_PER_UNIT` per unit, so a split spans several images); training GT is every block of
:func:`train_side` pixels of the remaining units, flat sky, ocean, ice and background included (a network that never
sees a flat region learns to "dehaze" it), from which the dataset cuts random crops.
"""
from __future__ import annotations

import dataclasses

import numpy as np

#: Side of a training GT block and of a held-out (val/test) image; medical scans are smaller.
TRAIN_SIDE = {'default': 192, 'medical': 128}
HELD_OUT_SIDE = {'default': 128, 'medical': 64}
#: Held-out images per source and split.
HELD_OUT_IMAGES = {'test': 12, 'val': 6}
#: At most this many held-out blocks of a split come from one unit (test spans at least three units and val two, so
#: neither measures, or chooses settings on, one or two images).
MAX_BLOCKS_PER_UNIT = {'test': 4, 'val': 3}
#: A block is usable when its standard deviation reaches this fraction of the pool's 90th-percentile block
#: (skips flat sky, ocean, air and scanner background).
MIN_TEXTURE = 0.4
TEXTURE_PERCENTILE = 90
#: Side of every block is a multiple of this (clean x4 SR).
BLOCK_MULTIPLE = 4
SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass
class Parent:
    """A unit of the split: one image, or one disjoint region of a larger image (``origin`` its top-left corner)."""

    name: str
    image: np.ndarray  # float32 (H, W, C) in [0, 1], or raw counts for nuclear medicine
    original: str
    origin: tuple[int, int] = (0, 0)


@dataclasses.dataclass
class Block:
    """A square block ``box = (y, x, h, w)`` of a parent."""

    name: str
    parent: Parent
    box: tuple[int, int, int, int]

    def pixels(self) -> np.ndarray:
        y, x, h, w = self.box
        return self.parent.image[y:y + h, x:x + w]

    def global_box(self) -> list[int]:
        y, x, h, w = self.box
        return [self.parent.origin[0] + y, self.parent.origin[1] + x, h, w]


def train_side(domain: str) -> int:
    return TRAIN_SIDE.get(domain, TRAIN_SIDE['default'])


def held_out_side(domain: str) -> int:
    return HELD_OUT_SIDE.get(domain, HELD_OUT_SIDE['default'])


def blocks(parent: Parent, side: int) -> list[Block]:
    """Non-overlapping ``side`` blocks of a parent (none when the parent is smaller)."""
    h, w = parent.image.shape[:2]
    side -= side % BLOCK_MULTIPLE
    return [Block(f'{parent.name}_y{y}_x{x}', parent, (y, x, side, side))
            for y in range(0, h - side + 1, side) for x in range(0, w - side + 1, side)]


def _std(block: Block) -> float:
    pixels = block.pixels()
    return float(pixels.std() / max(float(pixels.max()), 1e-6)) if pixels.max() > 1 else float(pixels.std())


def texture_threshold(parents: list[Parent], side: int, fraction: float = MIN_TEXTURE) -> float:
    """Standard deviation a block of ``side`` pixels needs to count as textured in this pool."""
    scores = [_std(b) for p in parents for b in blocks(p, side)]
    return fraction * float(np.percentile(scores, TEXTURE_PERCENTILE)) if scores else 0.0


def textured(parent: Parent, side: int, threshold: float) -> list[Block]:
    return [b for b in blocks(parent, side) if _std(b) >= threshold]


def split_pool(parents: list[Parent], domain: str, rng: np.random.Generator) -> dict[str, list[Block]]:
    """Blocks of each split: units are taken in a seeded order for test, then val, until each has its
    :data:`HELD_OUT_IMAGES`; the rest train. Units too small for a training block are held out first."""
    held, train = held_out_side(domain), train_side(domain)
    threshold = texture_threshold(parents, held)
    order = [parents[i] for i in rng.permutation(len(parents))]
    order.sort(key=lambda p: min(p.image.shape[:2]) >= train)  # stable: small units first, seeded order kept
    out: dict[str, list[Block]] = {split: [] for split in SPLITS}
    for parent in order:
        split = next((s for s in ('test', 'val') if len(out[s]) < HELD_OUT_IMAGES[s]), 'train')
        usable = textured(parent, held, threshold) if split != 'train' else []
        if not usable:  # a training unit, or one with nothing textured enough to score on
            out['train'] += blocks(parent, train)
            continue
        picked = sorted(rng.permutation(len(usable))[:min(MAX_BLOCKS_PER_UNIT[split], HELD_OUT_IMAGES[split]
                                                          - len(out[split]))].tolist())
        out[split] += [usable[i] for i in picked]
    short = [s for s in SPLITS if not out[s] or (s != 'train' and len(out[s]) < HELD_OUT_IMAGES[s])]
    if short:
        raise ValueError(f'the {domain} pool ({len(parents)} units) cannot fill the {"/".join(short)} split(s).')
    return out


def limit_blocks(chosen: list[Block], limit: int, rng: np.random.Generator) -> list[Block]:
    """At most ``limit`` of the blocks, a seeded choice kept in order."""
    return [chosen[i] for i in sorted(rng.permutation(len(chosen))[:limit].tolist())]
