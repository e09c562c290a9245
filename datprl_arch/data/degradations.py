"""Synthetic degradations that turn a clean image into the LQ of one MD-Mini task.

Every function takes a float32 ``(H, W, C)`` image in ``[0, 1]`` (BGR or gray) and a ``numpy`` Generator and returns
an LQ of the same shape and range: the networks are scale-1, so SR inputs are upsampled back to GT size (the official
data layout). Parameter ranges follow the usual synthetic benchmarks (Rain100L-like streaks, GoPro-like shake,
AAPM-Mayo-like quarter dose).
"""
from __future__ import annotations

import cv2
import numpy as np

#: Super-resolution factor of all SR tasks.
SR_SCALE = 4
#: Rain: streak layers per image, streak length (px), angle (deg from vertical), density (seed fraction), opacity.
RAIN_LAYERS = (1, 3)
RAIN_LENGTH = (10, 30)
RAIN_ANGLE = (-30.0, 30.0)
RAIN_DENSITY = (0.002, 0.01)
RAIN_OPACITY = (0.5, 0.9)
#: Motion blur: kernel size (px, odd) and random-walk steps of the camera trajectory.
SHAKE_KERNEL = (9, 23)
SHAKE_STEPS = 64
#: Low-dose CT: incident photons per detector bin and the largest line integral of the phantom.
CT_PHOTONS = (3e3, 1.2e4)
CT_MAX_LINE_INTEGRAL = 4.0
CT_ANGLES = 180
#: Low-count nuclear medicine: fraction of counts kept.
NM_KEEP = (0.1, 0.25)
#: Clouds: spectral exponent of the fractal field, coverage threshold, cloud brightness.
CLOUD_BETA = (2.6, 3.4)
CLOUD_COVER = (0.35, 0.65)
CLOUD_BRIGHTNESS = (0.85, 1.0)
#: Haze: scattering coefficient and airlight.
HAZE_BETA = (0.6, 1.6)
HAZE_AIRLIGHT = (0.7, 0.95)


def _u(rng: np.random.Generator, bounds) -> float:
    return float(rng.uniform(*bounds))


def _shape_like(out: np.ndarray, img: np.ndarray) -> np.ndarray:
    return np.clip(out.reshape(img.shape), 0.0, 1.0).astype(np.float32)


def bicubic_sr(img: np.ndarray, rng: np.random.Generator, scale: int = SR_SCALE) -> np.ndarray:
    """x``scale`` SR input: MATLAB-style bicubic downscaling (BasicSR's ``imresize``), then bicubic back up."""
    from basicsr.utils.matlab_functions import imresize
    h, w = img.shape[:2]
    small = np.clip(imresize(img, 1.0 / scale), 0, 1).astype(np.float32)
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


def rain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add 1-3 layers of rain streaks, each with its own angle, length and density (screen blending)."""
    h, w = img.shape[:2]
    streaks = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(RAIN_LAYERS[0], RAIN_LAYERS[1] + 1)):
        seeds = (rng.random((h, w)) < _u(rng, RAIN_DENSITY)).astype(np.float32) * rng.uniform(0.5, 1.0, (h, w))
        length = int(rng.integers(*RAIN_LENGTH))
        kernel = np.zeros((length, length), np.float32)
        kernel[:, length // 2] = 1.0
        rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), _u(rng, RAIN_ANGLE), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (length, length))
        kernel = cv2.GaussianBlur(kernel, (3, 3), 0.5)
        layer = cv2.filter2D(seeds.astype(np.float32), -1, kernel / max(kernel.max(), 1e-6))
        streaks = np.maximum(streaks, np.clip(layer, 0, 1) * _u(rng, RAIN_OPACITY))
    streaks = streaks[..., None]
    return _shape_like(1.0 - (1.0 - img) * (1.0 - streaks), img)


def shake_kernel(rng: np.random.Generator) -> np.ndarray:
    """Normalised camera-shake blur kernel from a random-walk trajectory with momentum; ``(K, K)`` float32."""
    size = int(rng.integers(SHAKE_KERNEL[0] // 2, SHAKE_KERNEL[1] // 2 + 1)) * 2 + 1
    velocity = rng.normal(size=2)
    velocity /= np.linalg.norm(velocity) + 1e-12
    pos, path = np.zeros(2), []
    for _ in range(SHAKE_STEPS):
        velocity = 0.8 * velocity + 0.6 * rng.normal(size=2)
        velocity /= np.linalg.norm(velocity) + 1e-12
        pos = pos + velocity * (size / SHAKE_STEPS) * 1.5
        path.append(pos.copy())
    path = np.array(path)
    path -= (path.max(0) + path.min(0)) / 2
    path = np.clip(path + (size - 1) / 2, 0, size - 1.001)
    kernel = np.zeros((size, size), np.float32)
    for y, x in path:  # bilinear splat of each trajectory point
        y0, x0 = int(y), int(x)
        dy, dx = y - y0, x - x0
        kernel[y0, x0] += (1 - dy) * (1 - dx)
        kernel[y0 + 1, x0] += dy * (1 - dx)
        kernel[y0, x0 + 1] += (1 - dy) * dx
        kernel[y0 + 1, x0 + 1] += dy * dx
    return kernel / kernel.sum()


def motion_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a random camera-shake kernel (reflected borders)."""
    out = cv2.filter2D(img, -1, shake_kernel(rng), borderType=cv2.BORDER_REFLECT)
    return _shape_like(out, img)


def kspace_sr(img: np.ndarray, rng: np.random.Generator, scale: int = SR_SCALE) -> np.ndarray:
    """MRI x``scale`` SR input: keep the central ``1/scale`` of k-space in each direction (zero-filled), magnitude."""
    h, w = img.shape[:2]
    out = np.empty_like(img)
    keep_h, keep_w = h // scale // 2, w // scale // 2
    for c in range(img.shape[2]):
        k = np.fft.fftshift(np.fft.fft2(img[..., c]))
        mask = np.zeros_like(k)
        mask[h // 2 - keep_h:h // 2 + keep_h, w // 2 - keep_w:w // 2 + keep_w] = 1
        out[..., c] = np.abs(np.fft.ifft2(np.fft.ifftshift(k * mask)))
    return _shape_like(out, img)


def ct_pair(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Low-dose CT: ``(normal-dose FBP, low-dose FBP)`` of the image as an attenuation map.

    Poisson noise is applied to transmitted photon counts of the parallel-beam sinogram (skimage ``radon``); both
    images are filtered back-projections (``iradon``, ramp filter), so they differ only by the dose.
    """
    from skimage.transform import iradon, radon
    gray = img[..., 0].astype(np.float64)
    theta = np.linspace(0.0, 180.0, CT_ANGLES, endpoint=False)
    sino = radon(gray, theta, circle=False)
    scale = CT_MAX_LINE_INTEGRAL / max(sino.max(), 1e-6)
    photons = _u(rng, CT_PHOTONS)
    counts = rng.poisson(photons * np.exp(-sino * scale))
    noisy = -np.log(np.maximum(counts, 1) / photons) / scale
    size = gray.shape[0]

    def fbp(s):
        return iradon(s, theta, output_size=size, filter_name='ramp', circle=False)

    gt, lq = fbp(sino), fbp(noisy)
    return _shape_like(gt, img), _shape_like(lq, img)


def poisson_thinning(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low-count NM: keep each count with probability ``p`` (binomial thinning), rescale by ``1/p``."""
    keep = _u(rng, NM_KEEP)
    return rng.binomial(np.maximum(counts, 0).astype(np.int64), keep) / keep


def clouds(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend a fractal cloud layer whose thickness map comes from a thresholded ``1/f`` field."""
    h, w = img.shape[:2]
    field = fractal_field(rng, h, w, _u(rng, CLOUD_BETA))
    cover = _u(rng, CLOUD_COVER)
    thickness = np.clip((field - (1 - cover)) / cover * 2.0, 0, 1) ** 0.8
    texture = 0.9 + 0.1 * fractal_field(rng, h, w, 1.5)
    cloud = _u(rng, CLOUD_BRIGHTNESS) * texture
    t = thickness[..., None]
    return _shape_like(img * (1 - t) + cloud[..., None] * t, img)


def haze(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering ``I = J t + A (1 - t)`` with a smooth, spatially varying transmission ``t``."""
    h, w = img.shape[:2]
    depth = 0.3 + 0.7 * fractal_field(rng, h, w, 3.5)
    t = np.exp(-_u(rng, HAZE_BETA) * depth)[..., None]
    airlight = _u(rng, HAZE_AIRLIGHT) * (1 + rng.uniform(-0.04, 0.04, size=img.shape[2]))
    return _shape_like(img * t + airlight * (1 - t), img)
