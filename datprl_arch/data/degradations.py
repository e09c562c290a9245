"""Synthetic degradations: a clean image -> a (GT, LQ) pair of one restoration task, with random parameters.

Every degradation takes a float32 ``(H, W, C)`` image in ``[0, 1]`` (BGR or gray), a ``numpy`` Generator and its
parameters, and returns ``(gt, lq)`` of the same shape and range (the networks are scale-1, so SR inputs are
upsampled back to GT size, the official data layout; GT is the input itself except for CT, whose GT is the
normal-dose reconstruction). A parameter is a fixed value, a ``[low, high]`` range drawn uniformly, or a list of
choices (strings). The defaults in :data:`DEGRADATIONS` are the MD-Mini test ranges (Rain100L-like streaks,
GoPro-like shake, AAPM-Mayo-like quarter dose); training sources (``mode: synth`` in the multi-domain dataset) draw
fresh parameters for every crop, usually from wider ranges given in the option file.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence, Union

import cv2
import numpy as np

#: Super-resolution factor of all SR tasks.
SR_SCALE = 4
#: Random-walk steps of a camera-shake trajectory.
SHAKE_STEPS = 64
#: Projection angles of the parallel-beam CT geometry and the largest line integral of the scaled image.
CT_ANGLES = 180
CT_MAX_LINE_INTEGRAL = 4.0
#: OpenCV interpolation of each SR downscaling kernel (``bicubic`` is MATLAB's antialiased ``imresize``).
SR_KERNELS = {'bicubic': None, 'area': cv2.INTER_AREA, 'bilinear': cv2.INTER_LINEAR}

Param = Union[float, int, str, Sequence]


def draw(rng: np.random.Generator, param: Param) -> Union[float, str]:
    """One value of a parameter: fixed, uniform in ``[low, high]``, or a random choice among strings."""
    if isinstance(param, str) or np.isscalar(param):
        return param
    values = list(param)
    if all(isinstance(v, str) for v in values):
        return values[int(rng.integers(len(values)))]
    low, high = values
    return float(rng.uniform(low, high))


def _shape_like(out: np.ndarray, img: np.ndarray) -> np.ndarray:
    return np.clip(out.reshape(img.shape), 0.0, 1.0).astype(np.float32)


def sr(img: np.ndarray, rng: np.random.Generator, kernel: Param = 'bicubic', scale: int = SR_SCALE) -> np.ndarray:
    """x``scale`` SR input: downscale with ``kernel`` (bicubic = BasicSR's MATLAB ``imresize``), bicubic back up."""
    from basicsr.utils.matlab_functions import imresize
    h, w = img.shape[:2]
    kind = draw(rng, kernel)
    if SR_KERNELS[kind] is None:
        small = np.clip(imresize(img, 1.0 / scale), 0, 1).astype(np.float32)
    else:
        small = cv2.resize(img, (w // scale, h // scale), interpolation=SR_KERNELS[kind])
    return _shape_like(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), img)


def fractal_field(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    """Random field with a ``1/f**beta`` power spectrum, scaled to ``[0, 1]``; ``(H, W)`` float32."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w))) / radius ** (beta / 2)
    spectrum[0, 0] = 0
    field = np.real(np.fft.ifft2(spectrum))
    return ((field - field.min()) / (np.ptp(field) + 1e-12)).astype(np.float32)


def rain(img: np.ndarray, rng: np.random.Generator, layers: Param = (1, 3), length: Param = (10, 30),
         angle: Param = (-30.0, 30.0), density: Param = (0.002, 0.01), opacity: Param = (0.5, 0.9)) -> np.ndarray:
    """Screen-blend ``layers`` layers of rain streaks, each with its own length (px), angle (deg from vertical),
    density (fraction of seed pixels) and opacity."""
    h, w = img.shape[:2]
    streaks = np.zeros((h, w), np.float32)
    for _ in range(int(round(draw(rng, layers)))):
        seeds = (rng.random((h, w)) < draw(rng, density)).astype(np.float32) * rng.uniform(0.5, 1.0, (h, w))
        size = max(3, int(draw(rng, length)))
        kernel = np.zeros((size, size), np.float32)
        kernel[:, size // 2] = 1.0
        rot = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), draw(rng, angle), 1.0)
        kernel = cv2.GaussianBlur(cv2.warpAffine(kernel, rot, (size, size)), (3, 3), 0.5)
        layer = cv2.filter2D(seeds.astype(np.float32), -1, kernel / max(kernel.max(), 1e-6))
        streaks = np.maximum(streaks, np.clip(layer, 0, 1) * draw(rng, opacity))
    return _shape_like(1.0 - (1.0 - img) * (1.0 - streaks[..., None]), img)


def shake_kernel(rng: np.random.Generator, size: Param = (9, 23)) -> np.ndarray:
    """Normalised camera-shake kernel of odd side ``size`` from a random-walk trajectory with momentum."""
    side = int(draw(rng, size)) // 2 * 2 + 1
    velocity = rng.normal(size=2)
    velocity /= np.linalg.norm(velocity) + 1e-12
    pos, path = np.zeros(2), []
    for _ in range(SHAKE_STEPS):
        velocity = 0.8 * velocity + 0.6 * rng.normal(size=2)
        velocity /= np.linalg.norm(velocity) + 1e-12
        pos = pos + velocity * (side / SHAKE_STEPS) * 1.5
        path.append(pos.copy())
    path = np.array(path)
    path -= (path.max(0) + path.min(0)) / 2
    path = np.clip(path + (side - 1) / 2, 0, side - 1.001)
    kernel = np.zeros((side, side), np.float32)
    for y, x in path:  # bilinear splat of each trajectory point
        y0, x0 = int(y), int(x)
        dy, dx = y - y0, x - x0
        kernel[y0, x0] += (1 - dy) * (1 - dx)
        kernel[y0 + 1, x0] += dy * (1 - dx)
        kernel[y0, x0 + 1] += (1 - dy) * dx
        kernel[y0 + 1, x0 + 1] += dy * dx
    return kernel / kernel.sum()


def motion_blur(img: np.ndarray, rng: np.random.Generator, size: Param = (9, 23)) -> np.ndarray:
    """Convolve with a random camera-shake kernel of side ``size`` (reflected borders)."""
    return _shape_like(cv2.filter2D(img, -1, shake_kernel(rng, size), borderType=cv2.BORDER_REFLECT), img)


def kspace_sr(img: np.ndarray, rng: np.random.Generator, window: Param = 'box', scale: int = SR_SCALE) -> np.ndarray:
    """MRI x``scale`` SR input: keep the central ``1/scale`` of k-space in each direction (zero-filled), magnitude.

    ``window``: ``box`` (plain truncation, Gibbs ringing) or ``hamming`` (a tapered truncation, as scanners filter).
    """
    h, w = img.shape[:2]
    keep_h, keep_w = h // scale // 2, w // scale // 2
    mask = np.zeros((h, w), np.float32)
    taper = np.outer(np.hamming(2 * keep_h), np.hamming(2 * keep_w)) if draw(rng, window) == 'hamming' else 1.0
    mask[h // 2 - keep_h:h // 2 + keep_h, w // 2 - keep_w:w // 2 + keep_w] = taper
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        k = np.fft.fftshift(np.fft.fft2(img[..., c]))
        out[..., c] = np.abs(np.fft.ifft2(np.fft.ifftshift(k * mask)))
    return _shape_like(out, img)


def ct_pair(img: np.ndarray, rng: np.random.Generator, photons: Param = (3e3, 1.2e4)) -> tuple[np.ndarray, np.ndarray]:
    """Low-dose CT: ``(normal-dose FBP, low-dose FBP)`` of the image as an attenuation map.

    Poisson noise is applied to the transmitted photon counts (``photons`` incident per detector bin) of the
    parallel-beam sinogram (skimage ``radon``); both images are filtered back-projections (``iradon``, ramp filter),
    so they differ only by the dose.
    """
    from skimage.transform import iradon, radon
    gray = img[..., 0].astype(np.float64)
    theta = np.linspace(0.0, 180.0, CT_ANGLES, endpoint=False)
    sino = radon(gray, theta, circle=False)
    scale = CT_MAX_LINE_INTEGRAL / max(sino.max(), 1e-6)
    incident = draw(rng, photons)
    counts = rng.poisson(incident * np.exp(-sino * scale))
    noisy = -np.log(np.maximum(counts, 1) / incident) / scale

    def fbp(s):
        return iradon(s, theta, output_size=gray.shape[0], filter_name='ramp', circle=False)[:, :gray.shape[1]]

    gt, lq = fbp(sino), fbp(noisy)
    return _shape_like(np.repeat(gt[..., None], img.shape[2], 2), img), _shape_like(
        np.repeat(lq[..., None], img.shape[2], 2), img)


def poisson_thinning(counts: np.ndarray, rng: np.random.Generator, keep: Param = (0.1, 0.25)) -> np.ndarray:
    """Low-count NM from raw counts: keep each count with probability ``keep`` (binomial thinning), rescale."""
    fraction = draw(rng, keep)
    return rng.binomial(np.maximum(counts, 0).astype(np.int64), fraction) / fraction


def low_count(img: np.ndarray, rng: np.random.Generator, peak: Param = (20.0, 60.0)) -> np.ndarray:
    """Low-count NM from a normalised image: Poisson counts with ``peak`` expected counts at intensity 1."""
    level = draw(rng, peak)
    return _shape_like(rng.poisson(np.maximum(img, 0) * level) / level, img)


def clouds(img: np.ndarray, rng: np.random.Generator, beta: Param = (2.6, 3.4), cover: Param = (0.35, 0.65),
           brightness: Param = (0.85, 1.0)) -> np.ndarray:
    """Blend a fractal cloud layer (spectral exponent ``beta``) over a ``cover`` fraction with a thickness map."""
    h, w = img.shape[:2]
    field = fractal_field(rng, h, w, draw(rng, beta))
    share = draw(rng, cover)
    thickness = np.clip((field - (1 - share)) / share * 2.0, 0, 1) ** 0.8
    cloud = draw(rng, brightness) * (0.9 + 0.1 * fractal_field(rng, h, w, 1.5))
    t = thickness[..., None]
    return _shape_like(img * (1 - t) + cloud[..., None] * t, img)


def haze(img: np.ndarray, rng: np.random.Generator, beta: Param = (0.6, 1.6), airlight: Param = (0.7, 0.95)
         ) -> np.ndarray:
    """Atmospheric scattering ``I = J t + A (1 - t)``, ``t = exp(-beta * depth)`` with a smooth random depth."""
    h, w = img.shape[:2]
    depth = 0.3 + 0.7 * fractal_field(rng, h, w, 3.5)
    t = np.exp(-draw(rng, beta) * depth)[..., None]
    light = draw(rng, airlight) * (1 + rng.uniform(-0.04, 0.04, size=img.shape[2]))
    return _shape_like(img * t + light * (1 - t), img)


def identity(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A clean input: the network should leave it as it is."""
    return img


@dataclasses.dataclass(frozen=True)
class Degradation:
    """A registered degradation: ``fn(img, rng, **params)`` returns the LQ, or ``(gt, lq)`` when ``pair``."""

    fn: Callable
    pair: bool = False
    #: Pixels of context the degradation reads around a crop (blur kernels, streaks); a multiple of ``SR_SCALE``.
    margin: int = 0


DEGRADATIONS: dict[str, Degradation] = {
    'sr': Degradation(sr), 'rain': Degradation(rain, margin=16), 'motion_blur': Degradation(motion_blur, margin=16),
    'kspace_sr': Degradation(kspace_sr), 'ct_low_dose': Degradation(ct_pair, pair=True),
    'low_count': Degradation(low_count), 'clouds': Degradation(clouds), 'haze': Degradation(haze),
    'identity': Degradation(identity),
}


def degrade(kind: str, img: np.ndarray, rng: np.random.Generator, params: Mapping[str, Param] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """``(gt, lq)`` of degradation ``kind`` applied to ``img`` (float ``(H, W, C)`` in ``[0, 1]``)."""
    spec = DEGRADATIONS[kind]
    out = spec.fn(img, rng, **dict(params or {}))
    return out if spec.pair else (img, out)


def check_params(kind: str, params: Mapping[str, Param]) -> list[str]:
    """Problems with a degradation spec (unknown type or parameter, malformed range); empty when it is usable."""
    import inspect
    if kind not in DEGRADATIONS:
        return [f'unknown degradation type {kind!r}; choose from {sorted(DEGRADATIONS)}.']
    accepted = [p for p in inspect.signature(DEGRADATIONS[kind].fn).parameters if p not in ('img', 'rng', 'counts')]
    problems = [f'degradation {kind!r} has no parameter {key!r}; accepted: {accepted}.' for key in params
                if key not in accepted]
    for key, value in params.items():
        values = [value] if isinstance(value, str) or np.isscalar(value) else list(value)
        numeric = all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)
        if not (all(isinstance(v, str) for v in values) or (numeric and len(values) in (1, 2))):
            problems.append(f'degradation {kind!r}: {key} must be a number, [low, high] or a list of names, '
                            f'got {value!r}.')
        elif numeric and len(values) == 2 and values[0] > values[1]:
            problems.append(f'degradation {kind!r}: {key} range {value!r} has low > high.')
    return problems
