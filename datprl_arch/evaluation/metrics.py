"""Per-image scoring with BasicSR's own metric functions, at the source's native bit depth or at 8 bits.

BasicSR's ``calculate_psnr`` / ``calculate_ssim`` read arrays on a [0, 255] scale (peak 255). Its test runner feeds
them ``tensor2img`` output, i.e. uint8: 16-bit medical images are then scored after a cut to 256 levels. Here a
16-bit source is scored at its native depth by default: its tensors are quantised to the 65536 stored levels and
scaled by 255/65535, which is exactly the PSNR/SSIM with peak 65535 computed by BasicSR's functions. 8-bit sources
are scored as BasicSR does in both modes; float sources (32-bit) are not quantised at all in native mode.

A metric that is not finite for an image (SSIM of an image under 11 px a side, whose 11x11 window leaves nothing;
PSNR of an exact match) is returned as None with a warning naming the image, so no NaN reaches an average.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import cv2
import numpy as np
import torch

from basicsr.metrics import calculate_metric
from basicsr.utils import get_root_logger, tensor2img

#: ``metric_bits`` choices: the source's stored depth, or BasicSR's 8-bit figures (``tensor2img`` to uint8).
NATIVE, EIGHT_BIT = 'native', '8'
METRIC_BITS = (NATIVE, EIGHT_BIT)
#: The range BasicSR's metric functions assume for their input arrays.
BASICSR_PEAK = 255.0
#: Stored levels (maximum value) of the integer bit depths; other depths (32: float images) are not quantised.
LEVELS = {8: 255.0, 16: 65535.0}
#: Side of the Gaussian window of BasicSR's SSIM: smaller images (after the crop border) have no SSIM.
SSIM_WINDOW = 11
#: Metric types whose value depends on the image's spatial extent through BasicSR's SSIM window.
SSIM_TYPES = ('calculate_ssim',)


def parse_metric_bits(value, where: str = 'metric_bits') -> str:
    """``'native'`` or ``'8'`` from an option value (YAML may give the int 8); anything else is a ValueError."""
    text = str(value).strip().lower() if value is not None else NATIVE
    if text not in METRIC_BITS:
        raise ValueError(f'{where}: {value!r} is not valid; use one of {list(METRIC_BITS)} (native: 16-bit sources '
                         'at peak 65535; 8: the 8-bit figure BasicSR computes).')
    return text


def metric_bits_note(metric_bits: str) -> str:
    """One sentence stating the choice, for logs and reports."""
    if metric_bits == NATIVE:
        return ('16-bit sources are scored at their native depth (peak 65535: arrays = uint16 values x 255/65535 '
                "through BasicSR's calculate_psnr/calculate_ssim); 8-bit sources as BasicSR does.")
    return "All sources are scored at 8 bits, as BasicSR's own test does (tensor2img to uint8)."


def metric_array(tensor: torch.Tensor, bit_depth: int = 8, metric_bits: str = NATIVE) -> np.ndarray:
    """``[C, H, W]`` / ``[1, C, H, W]`` RGB tensor in ``[0, 1]`` -> ``(H, W[, C])`` BGR array on BasicSR's [0, 255]
    scale: uint8 from ``tensor2img`` at 8 bits; otherwise float64 of the values a restored image is stored with
    (16-bit: rounded like :func:`~datprl_arch.data.image_io.to_stored`), x 255/levels."""
    if metric_bits == EIGHT_BIT or bit_depth == 8:
        return tensor2img(tensor)
    img = tensor2img(tensor, out_type=np.float32)  # float32, clamped to [0, 1], BGR
    levels = LEVELS.get(int(bit_depth))
    if levels is None:
        return img.astype(np.float64) * BASICSR_PEAK
    stored = (img * np.float32(levels)).round()  # the stored values, as image_io.to_stored writes them
    return stored.astype(np.float64) * (BASICSR_PEAK / levels)


def _usable_side(img: np.ndarray, crop_border: int) -> int:
    return min(img.shape[:2]) - 2 * crop_border


def score(output: torch.Tensor, gt: torch.Tensor, metric_opts: Mapping[str, Mapping], bit_depth: int = 8,
          metric_bits: str = NATIVE, image: str = '') -> dict[str, Optional[float]]:
    """Each metric of ``metric_opts`` (a ``val.metrics`` mapping: name -> {type, crop_border, ...}) of ``output``
    against ``gt`` (both ``[1, C, H, W]`` or ``[C, H, W]`` RGB in ``[0, 1]``, same size), computed by BasicSR's
    ``calculate_metric`` on :func:`metric_array` arrays. Returns name -> value, None where the metric is not
    finite for this image (warned, naming ``image``)."""
    img, img2 = metric_array(output, bit_depth, metric_bits), metric_array(gt, bit_depth, metric_bits)
    if img.shape != img2.shape:
        raise ValueError(f'{image}: output {img.shape[:2]} and ground truth {img2.shape[:2]} differ in size; '
                         'check the scale of the network and of the dataset (upsample_lq).')
    results: dict[str, Optional[float]] = {}
    logger = get_root_logger()
    for name, opt in metric_opts.items():
        crop = int(opt.get('crop_border', 0))
        if opt.get('type') in SSIM_TYPES and _usable_side(img, crop) < SSIM_WINDOW:
            logger.warning(f'{image}: {name} skipped: {img.shape[1]}x{img.shape[0]} px (crop_border {crop}) is '
                           f'under the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window; left out of the {name} averages.')
            results[name] = None
            continue
        value = float(calculate_metric({'img': img, 'img2': img2}, dict(opt)))
        if not math.isfinite(value):
            logger.warning(f'{image}: {name} is {value} (e.g. an exact match); left out of the {name} averages.')
            value = None
        results[name] = value
    return results


def upsample_to(lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (OpenCV, as the dataset's ``upsample_lq``) resize of a ``[1, C, h, w]`` tensor to ``size`` (H, W),
    clipped to ``[0, 1]``: the degraded input scored against a larger ground truth."""
    arr = lq.detach().float().cpu()[0].numpy().transpose(1, 2, 0)
    up = cv2.resize(arr, (size[1], size[0]), interpolation=cv2.INTER_CUBIC).reshape(size[0], size[1], -1)
    return torch.from_numpy(np.clip(up, 0.0, 1.0).transpose(2, 0, 1).copy())[None]
