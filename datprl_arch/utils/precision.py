"""Mixed precision: the autocast dtypes the package accepts and whether a device runs them natively.

One place for the rule used by training (``train.use_amp``/``amp_dtype``), ``bench``, ``benchmark`` and ``restore``
(``--amp``): on CUDA, bf16 and fp16 (bf16 is emulated and slow before compute capability 8.0); on the CPU, bf16
only where the processor has native bfloat16 instructions (``avx512_bf16`` or ``amx_bf16``), where oneDNN runs the
convolutions and matrix products in bf16 (measured 1.2-1.6x faster than float32 on the development machine's
EPYC). fp16 on the CPU has no fast path and is refused.

On the CPU the networks run in the channels_last memory format (:func:`memory_format`): oneDNN's convolutions work
in that layout, so a contiguous network pays a layout conversion around each of them.
"""
from __future__ import annotations

import os.path as osp
from typing import Optional

import torch

#: ``amp`` / ``amp_dtype`` names -> autocast dtype.
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic.
CPU_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
CPUINFO = '/proc/cpuinfo'


def cpu_bf16_flags(cpuinfo: str = CPUINFO) -> tuple[str, ...]:
    """The native-bf16 flags of this CPU (empty where there are none or ``cpuinfo`` cannot be read)."""
    if not osp.isfile(cpuinfo):
        return ()
    with open(cpuinfo, encoding='utf-8', errors='replace') as f:
        flags = set()
        for line in f:
            if line.startswith('flags'):
                flags.update(line.split(':', 1)[-1].split())
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def amp_problem(device: torch.device, amp: str) -> Optional[str]:
    """Why ``amp`` cannot run (fast) on ``device``, or None when it can. ``amp`` must be a key of AMP_DTYPES."""
    if amp not in AMP_DTYPES:
        return f'amp {amp!r}: expected one of {sorted(AMP_DTYPES)}'
    if device.type == 'cuda':
        if amp == 'bf16' and not torch.cuda.is_bf16_supported(including_emulation=False):
            return (f'{torch.cuda.get_device_name(device)} has no native bf16, so bf16 is emulated and slow; use fp16 '
                    '(train.amp_dtype: fp16, --amp fp16)')
        return None
    if device.type == 'cpu':
        if amp == 'fp16':
            return 'fp16 autocast has no fast path on the CPU; use bf16 (on CPUs with native bf16) or float32'
        if not cpu_bf16_flags():
            return (f'this CPU has no native bf16 (none of {", ".join(CPU_BF16_FLAGS)} in {CPUINFO}); '
                    'run in float32')
        return None
    return f'amp needs a CUDA device or a CPU, the device is {device}'


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` in ``dtype``; disabled (float32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def memory_format(device: torch.device) -> torch.memory_format:
    """The memory format to run a network in on ``device``: channels_last on the CPU, where oneDNN's convolutions
    use it (measured on the development machine, 6-task network: float32 train step 1,747 -> 1,589 ms at 2x3x64x64
    and 15.5 -> 13.0 s at 4x3x128x128; bf16 1,354 -> 1,143-1,263 ms), contiguous on CUDA (not measured there)."""
    return torch.channels_last if device.type == 'cpu' else torch.contiguous_format


def use_tf32(device: torch.device) -> str:
    """Opt-in TF32 (``train.tf32``, ``--tf32``) for float32 work on CUDA: matrix products at
    ``set_float32_matmul_precision('high')`` and cuDNN convolutions in TF32 (its default already), about 10 bits of
    mantissa instead of 23 on Ampere and newer GPUs. Without it PyTorch's defaults stand: float32 matrix products
    (attention, linear layers) in full precision, convolutions in TF32. Process-wide; nothing changes on the CPU.
    Returns the line to log."""
    if device.type != 'cuda':
        return f'tf32: CUDA only; float32 on {device.type} is unchanged.'
    torch.set_float32_matmul_precision('high')
    torch.backends.cudnn.allow_tf32 = True
    return 'tf32: float32 matrix products and convolutions on CUDA in TF32 (set_float32_matmul_precision high).'
