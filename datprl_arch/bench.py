"""Benchmark of the DATPRL networks: ``python -m datprl_arch.bench [--device cuda --amp bf16]``.

Prints up to three tables:

1. for the 6-task, CDD11 and prompt-free configurations: parameters, GFLOPs, eval time (1x3x256x256), train step
   time (forward + backward, 4x3x128x128) and peak memory, for our network and for the literal implementation of
   the official computation (``literal=True``) at the same weights (``--impls ... datprl-checkpoint``: with
   gradient checkpointing of the transformer blocks, for the training memory it saves);
2. the speed-up over the official computation at the sizes of the method spec (eval 1x3x128x128, train 2x3x64x64);
3. with ``--data``: training-loader throughput on MD-Mini (disk PNG vs LMDB, 0/1/2 workers; built if missing);
4. with ``--backbones``: what DATPRL's prompts cost on BasicSR backbones (the ``PromptedBackbone`` networks of
   ``options/train/md_mini_<backbone>.yml``): train step and eval time of the bare and the prompted backbone at the
   demo's batch (12x3x48x48), and the prompts' overhead.

Each configuration runs in a fresh process (so peak memory is per configuration), with ``--threads`` CPU threads;
table 4 times the bare and the prompted backbone alternately in one process, so both see the same machine. The
measuring processes keep freed memory for reuse as the training command does (``--system-malloc``: glibc's defaults).
Timings are medians over ``--repeats`` runs after ``--warmup`` runs.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

import torch

from .utils import allocator
from .utils.precision import AMP_DTYPES, amp_problem, autocast, memory_format
from .utils.threads import add_threads_argument, default_threads

SPEC_EVAL_SHAPE, SPEC_TRAIN_SHAPE = (1, 3, 128, 128), (2, 3, 64, 64)  # the method spec's timing sizes
#: The Restormer backbone of the released networks (options/train/datprl_6t.yml, datprl_cdd11.yml).
BACKBONE = dict(dim=48, enc_blk_nums=[4, 6, 6], middle_blk_num=8, dec_blk_nums=[6, 6, 4], refine_blk_num=4,
                heads=[1, 2, 4, 8])
#: The released 6-task network (both pools) and the CDD11 network (task pool only); the tests use these too.
SIX_TASK = dict(type='DualPromptRestormerv3', **BACKBONE, domain_pool_size=15, degradation_pool_size=15,
                domain_prompt_dim=1024, degradation_prompt_dim=1024, domain_top_k=5, degradation_top_k=3,
                value_num_tokens=2)
CDD11 = dict(type='DualPromptRestormerv3_only_task_prompt', **BACKBONE, degradation_pool_size=15,
             degradation_prompt_dim=1024, degradation_top_k=3, value_num_tokens=2)
CONFIGS = {
    '6t': SIX_TASK,
    'cdd11': CDD11,
    'prompt-free': dict(SIX_TASK, use_prompt=False),
}
#: ``datprl-checkpoint``: gradient checkpointing of the transformer blocks (``use_checkpoint``), for its peak memory.
IMPLS = {'official': dict(literal=True), 'datprl': {}, 'datprl-lean': dict(lean=True),
         'datprl-checkpoint': dict(use_checkpoint=True)}
#: ``network_g`` of options/train/md_mini_<name>.yml (a test keeps them equal): backbones wrapped by PromptedBackbone.
_POOLS = {'task_pool': {'size': 12, 'dim': 64, 'top_k': 3}, 'domain_pool': {'size': 6, 'dim': 64, 'top_k': 2}}
_FUSION = {'method': 'cross_attention', 'gate_init': 'identity'}
WRAPPED = {
    'swinir': dict(type='PromptedBackbone', backbone=dict(
        type='SwinIR', upscale=1, upsampler='', img_size=48, window_size=8, embed_dim=24, depths=[2, 2, 2],
        num_heads=[2, 2, 2], mlp_ratio=2, resi_connection='1conv'),
        taps={'domain': 'conv_first', 'task': 'layers.0'}, inject_after=['layers.1', 'layers.2'], prompt=_POOLS,
        fusion=_FUSION, pad_multiple=8),
    'rrdbnet': dict(type='PromptedBackbone', backbone=dict(
        type='RRDBNet', num_in_ch=3, num_out_ch=3, scale=1, num_feat=48, num_block=6, num_grow_ch=24),
        taps={'domain': 'conv_first', 'task': 'body.0'}, inject_after=['body.2', 'body.4'], prompt=_POOLS,
        fusion=_FUSION),
    'edsr': dict(type='PromptedBackbone', backbone=dict(
        type='EDSR', num_in_ch=3, num_out_ch=3, upscale=1, num_feat=48, num_block=12, img_range=1.0),
        taps={'domain': 'conv_first', 'task': 'body.1'}, inject_after=['body.3', 'body.6', 'body.9'], prompt=_POOLS,
        fusion=_FUSION),
}
BACKBONE_TRAIN_SHAPE, BACKBONE_EVAL_SHAPE = (12, 3, 48, 48), (1, 3, 128, 128)  # the demo's batch; a val-sized image
AMP_CHOICES = {'none': None, **AMP_DTYPES}
MIB = 2**20
NATIVE_BF16_CAPABILITY = 8  # CUDA compute capability from which bf16 runs natively (Ampere); V100/T4 emulate it


def use_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device (``--device cuda:N``) and tune convolutions for the measured shapes,
    as BasicSR's train and test pipelines do (``cudnn.benchmark``); nothing for the CPU."""
    if device.type != 'cuda':
        return
    if device.index is not None:
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device`` since ``reset_peak_memory``; on the CPU, the process's peak RSS."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def bf16_notice(device: torch.device) -> str | None:
    """A note for ``--amp bf16`` on a GPU without native bf16 (compute capability < 8: V100, T4), else None."""
    if device.type != 'cuda' or torch.version.hip:
        return None
    if torch.cuda.get_device_capability(device)[0] >= NATIVE_BF16_CAPABILITY:
        return None
    return (f'note: {torch.cuda.get_device_name(device)} ({device}) has no native bf16: --amp bf16 is emulated and '
            'slow on it; --amp fp16 measures its fast path')


def _timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn`` (the device synchronised before and after)."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _median_seconds(fn, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def _gflops(net, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops() / 1e9


def measure(config: dict, impl: dict, args: argparse.Namespace, eval_shape, train_shape, flops: bool) -> dict:
    """Build one network (fixed seed, so every implementation has the same weights) and time it."""
    import datprl_arch  # noqa: F401  (registration, in the spawned process)
    from basicsr.archs import build_network

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    use_device(device)
    # the official computation runs as the official code does: contiguous
    default = torch.contiguous_format if impl.get('literal') else memory_format(device)
    fmt = torch.channels_last if args.channels_last else default
    net = build_network(dict(config, **impl)).to(device, memory_format=fmt)
    if args.compile:  # static shapes: Inductor's dynamic-shape lowering fails on the Restormer (restormer_arch)
        net.compile(dynamic=False)
    amp_context = autocast(device, AMP_CHOICES[args.amp])
    x = torch.rand(*eval_shape, device=device).contiguous(memory_format=fmt)
    row = {'params': sum(p.numel() for p in net.parameters()) / 1e6}
    net.eval()
    if flops:
        row['gflops'] = _gflops(net, x)
    reset_peak_memory(device)
    with torch.no_grad(), amp_context:
        row['eval_ms'] = 1e3 * _median_seconds(lambda: net(x), args.warmup, args.repeats, device)
    net.train()
    batch = torch.rand(*train_shape, device=device).contiguous(memory_format=fmt)
    target = torch.rand_like(batch)

    def step():
        net.zero_grad(set_to_none=True)
        with amp_context:
            loss = (net(batch).float() - target).abs().mean()
        loss.backward()

    row['train_ms'] = 1e3 * _median_seconds(step, args.warmup, args.repeats, device)
    row['peak_mib'] = peak_memory_mib(device)
    return row


def _measuring_pool(ctx):
    """A one-process pool to measure in, keeping freed memory as the command lines do (``--system-malloc`` sets the
    opt-out, which the spawned process inherits)."""
    return ctx.Pool(1, initializer=allocator.keep_freed_memory)


def _run(jobs, args):
    """Run each (config, impl, shapes, flops) job in a fresh spawned process."""
    ctx = mp.get_context('spawn')
    results = []
    for job in jobs:
        with _measuring_pool(ctx) as pool:
            results.append(pool.apply(measure, (*job[:2], args, *job[2:])))
    return results


def _emit(text: str) -> None:
    """Write a line of the report to stdout at once (tables appear while later measurements run)."""
    sys.stdout.write(text + '\n')
    sys.stdout.flush()


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [' | '.join(str(c).rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return '\n'.join(lines)


def measure_pair(configs, args: argparse.Namespace) -> dict:
    """Bare and prompted backbone in one process, timed alternately (a drift of the machine's speed hits both
    alike): medians of each and the median of the per-round ratios."""
    import datprl_arch  # noqa: F401  (registration, in the spawned process)
    from basicsr.archs import build_network

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    use_device(device)
    fmt = memory_format(device)
    nets = []
    for config in configs:
        torch.manual_seed(0)
        nets.append(build_network(dict(config)).to(device, memory_format=fmt))
    x = torch.rand(*BACKBONE_EVAL_SHAPE, device=device).contiguous(memory_format=fmt)
    batch = torch.rand(*BACKBONE_TRAIN_SHAPE, device=device).contiguous(memory_format=fmt)
    target = torch.rand_like(batch)
    amp_context = autocast(device, AMP_CHOICES[args.amp])

    def evaluate(net):
        with torch.no_grad(), amp_context:
            net.eval()(x)

    def step(net):
        net.train().zero_grad(set_to_none=True)
        with amp_context:
            loss = (net(batch).float() - target).abs().mean()
        loss.backward()

    row = {'params': [sum(p.numel() for p in net.parameters()) / 1e6 for net in nets]}
    for kind, fn in (('eval', evaluate), ('train', step)):
        for _ in range(args.warmup):
            for net in nets:
                fn(net)
        rounds = [[_timed(lambda: fn(net), device) for net in nets] for _ in range(args.repeats)]
        row[kind] = [1e3 * statistics.median(r[i] for r in rounds) for i in range(len(nets))]
        row[f'{kind}_overhead'] = statistics.median(r[1] / r[0] for r in rounds) - 1
    return row


def backbone_table(names, args) -> str:
    """Table 4: bare vs prompted backbone at the demo's sizes, timed alternately in one fresh process each."""
    rows = []
    ctx = mp.get_context('spawn')
    for name in names:
        wrapped = WRAPPED[name]
        with _measuring_pool(ctx) as pool:
            row = pool.apply(measure_pair, ((wrapped['backbone'], wrapped), args))
        rows.append([name, f"{row['params'][0]:.3f}", f"{row['params'][1]:.3f}", len(wrapped['inject_after']),
                     f"{row['train'][0]:.0f}", f"{row['train'][1]:.0f}", f"{100 * row['train_overhead']:+.1f}%",
                     f"{row['eval'][0]:.0f}", f"{row['eval'][1]:.0f}", f"{100 * row['eval_overhead']:+.1f}%"])
    train, evaluation = 'x'.join(map(str, BACKBONE_TRAIN_SHAPE)), 'x'.join(map(str, BACKBONE_EVAL_SHAPE))
    return (f'prompts on BasicSR backbones (PromptedBackbone of options/train/md_mini_<backbone>.yml): train step '
            f'{train}, eval {evaluation}; bare and prompted timed alternately, overhead = median of the per-round '
            'ratios\n' + _table(
                ['backbone', 'params M', 'prompted M', 'injections', 'train ms', 'prompted train ms', 'overhead',
                 'eval ms', 'prompted eval ms', 'overhead'], rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    parser.add_argument('--amp', default='none', choices=AMP_CHOICES,
                        help='autocast dtype (CUDA; bf16 also on CPUs with native bf16)')
    add_threads_argument(parser)
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument('--impls', nargs='+', default=['official', 'datprl'], choices=IMPLS)
    parser.add_argument('--eval-size', type=int, default=256)
    parser.add_argument('--train-batch', type=int, default=4)
    parser.add_argument('--train-size', type=int, default=128)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--channels-last', action='store_true',
                        help='run in the channels_last memory format also where it is not the default (the default: '
                             'channels_last on the CPU, contiguous on CUDA and for the official computation)')
    parser.add_argument('--compile', action='store_true', help='net.compile() (slow first call; not on CPU CI)')
    parser.add_argument('--skip-speedup', action='store_true', help='skip the official-vs-ours table at spec sizes')
    parser.add_argument('--data', action='store_true', help='also measure data loading on MD-Mini')
    parser.add_argument('--data-root', default='datasets/md_mini', help='MD-Mini folder for --data')
    parser.add_argument('--skip-networks', action='store_true', help='skip the network tables')
    parser.add_argument('--backbones', nargs='*', choices=WRAPPED, default=None,
                        help='the prompts\' overhead on BasicSR backbones (all of them when given without names)')
    parser.add_argument('--speedup-only', action='store_true', help='only the official-vs-ours table at spec sizes')
    parser.add_argument('--system-malloc', action='store_true',
                        help="glibc's default allocator settings (freed memory returned to the system) instead of "
                             'the command lines\' (datprl_arch.utils.allocator)')
    args = parser.parse_args(argv)
    args.threads = args.threads or default_threads()
    if args.system_malloc:
        os.environ[allocator.OPT_OUT] = '1'  # inherited by the spawned measuring processes
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f'--device {args.device!r}: expected cpu, cuda or cuda:N')
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is visible')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f'--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) are visible')
    problem = amp_problem(device, args.amp) if device.type == 'cpu' and args.amp != 'none' else None
    if problem:
        parser.error(f'--amp {args.amp}: {problem}')
    notice = bf16_notice(device) if args.amp == 'bf16' else None

    if args.data:
        from . import throughput
        from .mdmini import build
        build(args.data_root)
        _emit('data loading on MD-Mini: samples/s at 128x128 crops')
        _emit(throughput.table(throughput.measure(args.data_root)) + '\n')
    if args.backbones is not None:
        _emit(backbone_table(args.backbones or list(WRAPPED), args) + '\n')
    if args.skip_networks:
        return
    eval_shape = (1, 3, args.eval_size, args.eval_size)
    train_shape = (args.train_batch, 3, args.train_size, args.train_size)
    _emit(f'device {args.device}, amp {args.amp}, threads {args.threads}, torch {torch.__version__}, '
          f'median of {args.repeats} after {args.warmup} warm-up')
    if notice:
        _emit(notice)
    if not args.speedup_only:
        jobs = [(CONFIGS[c], IMPLS[i], eval_shape, train_shape, True) for c in args.configs for i in args.impls]
        rows = [[c, i, f"{r['params']:.2f}", f"{r['gflops']:.1f}", f"{r['eval_ms']:.0f}", f"{r['train_ms']:.0f}",
                 f"{r['peak_mib']:.0f}"]
                for (c, i), r in zip([(c, i) for c in args.configs for i in args.impls], _run(jobs, args))]
        mem = 'peak CUDA MiB' if args.device.startswith('cuda') else 'peak RSS MiB'
        _emit(_table(['config', 'impl', 'params M', f'GFLOPs@{args.eval_size}', f'eval ms 1x3x{args.eval_size}',
                      f'train ms {args.train_batch}x3x{args.train_size}', mem], rows))
    if args.skip_speedup or 'official' not in args.impls:
        return
    _emit('\nspeed-up over the official computation at the spec sizes (eval 1x3x128x128, train 2x3x64x64)')
    ours = [i for i in args.impls if i != 'official']
    speed_jobs = [(CONFIGS[c], IMPLS[i], SPEC_EVAL_SHAPE, SPEC_TRAIN_SHAPE, False)
                  for c in args.configs for i in ['official', *ours]]
    results = iter(_run(speed_jobs, args))
    rows = []
    for c in args.configs:
        base = next(results)
        for i in ours:
            r = next(results)
            rows.append([c, i, f"{base['eval_ms']:.0f}", f"{r['eval_ms']:.0f}",
                         f"{base['eval_ms'] / r['eval_ms']:.2f}x", f"{base['train_ms']:.0f}", f"{r['train_ms']:.0f}",
                         f"{base['train_ms'] / r['train_ms']:.2f}x"])
    _emit(_table(['config', 'impl', 'official eval ms', 'eval ms', 'eval speed-up', 'official train ms', 'train ms',
                  'train speed-up'], rows))


if __name__ == '__main__':
    main()
