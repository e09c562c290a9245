"""The CUDA code paths of training and benchmarking, exercised on the CPU: the non-finite guard under fp32, bf16
autocast and the fp16 GradScaler (as ``init_training_settings`` sets them on CUDA, with device type cpu), graph
release after a skipped step, device-side loss pieces on the ``meta`` device, testing with several GPUs, bf16
without native support, compile, and ``bench`` on GPU N (a faked ``torch.cuda``)."""
import argparse
import gc
import logging
import weakref
from types import SimpleNamespace

import pytest
import torch

from datprl_arch import bench
from basicsr.archs import build_network
from basicsr.models import build_model
from datprl_arch.archs.prompt.pool import PromptPool
from datprl_arch.losses import DATPRLBalanceLoss, DATPRLDiversityLoss, DATPRLDomainAlignmentLoss, DATPRLSupConLoss
from datprl_arch.models.datprl_model import DATPRLModel
from datprl_arch.models.prompt_usage import PromptUsageTracker
from datprl_arch.utils import precision

from test_training import NETWORK, _batch, _model_opt, data  # noqa: F401  (data: the module's fixture)

AMP_MODES = {'fp32': None, 'bf16': torch.bfloat16}


@pytest.fixture
def log(caplog):
    """BasicSR's logger does not propagate: capture it directly."""
    logger = logging.getLogger('basicsr')
    caplog.set_level(logging.INFO, logger='basicsr')
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _with_amp(model, mode):
    """What ``init_training_settings`` sets on CUDA for ``mode``, with device type cpu."""
    model.amp_dtype = {'fp16': torch.float16, **AMP_MODES}[mode]
    model.scaler = torch.amp.GradScaler('cpu', enabled=mode == 'fp16')
    return model


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _alive_saved_bytes(model, batch, current_iter) -> int:
    """Bytes of the tensors autograd saved during one step that a graph still holds after it (parameters excluded).
    Each is saved as a detached alias (no reference cycle through its own ``grad_fn``) that only the graph holds."""
    saved = []

    def pack(tensor):
        alias = tensor.detach()
        saved.append(weakref.ref(alias))
        return alias

    model.feed_data(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.optimize_parameters(current_iter)
    gc.collect()
    params = {p.untyped_storage().data_ptr() for p in model.net_g.parameters()}
    alive = [ref() for ref in saved]
    return sum(t.untyped_storage().nbytes() for t in {id(t): t for t in alive if t is not None}.values()
               if t.untyped_storage().data_ptr() not in params)


@pytest.mark.parametrize('mode', ['fp32', 'fp16'])
def test_a_skipped_step_drops_its_graph_before_the_next_forward(tmp_path, data, mode):  # noqa: F811
    opt = _model_opt(data, tmp_path, prompt_contrastive_weight=0.1)
    model = _with_amp(build_model(opt), mode)
    normal = _alive_saved_bytes(model, _batch(opt), 1)
    skipped = _alive_saved_bytes(model, _batch(opt, nan=True), 2)
    assert model.nonfinite_steps == 1
    assert skipped <= normal  # the skipped forward's graph is gone (it held megabytes here before)
    assert model.output.grad_fn is None and model.net_g.prompt_state is None


@pytest.mark.parametrize('mode', list(AMP_MODES))
def test_a_nonfinite_gradient_under_a_finite_loss_skips_the_step_and_its_usage(tmp_path, data, mode):  # noqa: F811
    opt = _model_opt(data, tmp_path, grad_clip=1.0, prompt_balance_weight=0.1)
    model = _with_amp(build_model(opt), mode)
    weights, ema = _weights(model.net_g), _weights(model.net_g_ema)
    param = next(p for p in model.net_g.parameters() if p.requires_grad)
    hook = param.register_hook(lambda grad: grad * float('inf'))  # one gradient inf/NaN, every loss finite
    model.feed_data(_batch(opt))
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert all(torch.isfinite(torch.tensor(v)) for v in log.values()), log  # the losses were finite
    assert model.nonfinite_steps == 1
    assert all(torch.equal(weights[k], v) for k, v in model.net_g.state_dict().items())
    assert all(torch.equal(ema[k], v) for k, v in model.net_g_ema.state_dict().items())
    assert all(int(c.sum()) == 0 for c in model.objectives.tracker.counts.values())  # the skipped step's selections
    hook.remove()
    model.optimize_parameters(2)
    assert model.nonfinite_steps == 0
    assert all(torch.isfinite(v).all() for v in model.net_g.state_dict().values())
    assert not all(torch.equal(weights[k], v) for k, v in model.net_g.state_dict().items())
    counts = model.objectives.tracker.counts
    assert int(counts['task'].sum()) == 6 * NETWORK['degradation_top_k']
    assert int(counts['domain'].sum()) == 6 * NETWORK['domain_top_k']


def test_loss_pieces_and_usage_counts_run_on_the_meta_device():
    """``meta`` tensors have no values: whatever runs here reads nothing back from the device (no GPU sync)."""
    meta = torch.device('meta')
    features = torch.randn(6, 8, device=meta, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 3], device=meta)
    DATPRLSupConLoss(0.1)(features, labels).backward()
    assert features.grad.shape == (6, 8)
    pool = PromptPool(5, 8, 2, 2).to(meta)
    out = pool(torch.randn(6, 8, device=meta))
    loss = DATPRLBalanceLoss()(out) + DATPRLDiversityLoss()(pool) + DATPRLDomainAlignmentLoss()(
        out.prompt, torch.randn(6, 8, device=meta))
    loss.backward()
    tracker = PromptUsageTracker({'task': 5}, update_freq=10)
    tracker.update('task', out.indices)
    assert tracker.counts['task'].device == meta and tracker.counts['task'].shape == (5,)


def test_testing_with_several_gpus_runs_on_one_and_training_is_refused(tmp_path, data, log):  # noqa: F811
    opt = _model_opt(data, tmp_path)
    opt.update(is_train=False)
    model = build_model(opt)  # num_gpu 0 to build on the CPU; then what num_gpu: auto gives on a 2-GPU machine
    model.opt['num_gpu'] = 2
    net = model.model_to_device(build_network(dict(NETWORK)))
    assert not isinstance(net, torch.nn.DataParallel) and model.opt['num_gpu'] == 1
    assert 'num_gpu: 2 without a launcher: testing on one GPU (cpu); several GPUs need torchrun.' in log.text
    train_model = build_model(_model_opt(data, tmp_path))
    train_model.opt['num_gpu'] = 2
    with pytest.raises(ValueError, match=r'num_gpu: 2 without a launcher would use DataParallel.*torchrun.*'
                                         r'CUDA_VISIBLE_DEVICES=0'):
        train_model.model_to_device(build_network(dict(NETWORK)))


def test_bf16_on_a_gpu_without_native_bf16_says_so_and_suggests_fp16(monkeypatch, log):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Tesla V100-SXM2-16GB')
    gpu = SimpleNamespace(device=torch.device('cuda'))
    assert DATPRLModel._amp_dtype(gpu, {'use_amp': True}) == torch.bfloat16
    assert 'Tesla V100-SXM2-16GB has no native bf16, so bf16 is emulated and slow; use fp16 (train.amp_dtype: fp16' \
        in log.text
    log.clear()
    assert DATPRLModel._amp_dtype(gpu, {'use_amp': True, 'amp_dtype': 'fp16'}) == torch.float16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    assert DATPRLModel._amp_dtype(gpu, {'use_amp': True}) == torch.bfloat16
    assert 'native' not in log.text
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda: ())
    cpu = SimpleNamespace(device=torch.device('cpu'))
    assert DATPRLModel._amp_dtype(cpu, {'use_amp': True}) is None
    assert 'use_amp (bf16): this CPU has no native bf16 (none of avx512_bf16, amx_bf16 in /proc/cpuinfo); run in ' \
        'float32; training in float32.' in log.text
    assert DATPRLModel._amp_dtype(cpu, {'use_amp': True, 'amp_dtype': 'fp16'}) is None
    assert 'fp16 autocast has no fast path on the CPU' in log.text
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda: ('avx512_bf16',))
    assert DATPRLModel._amp_dtype(cpu, {'use_amp': True}) == torch.bfloat16
    assert 'use_amp: autocast in bf16 on cpu.' in log.text


@pytest.fixture
def counting_compile(monkeypatch):
    """``nn.Module.compile`` through dynamo with a backend that counts the graphs it is given and runs them eagerly
    (Inductor itself takes minutes on the CPU); returns (compile keywords, graph count)."""
    calls, graphs = [], []
    original = torch.nn.Module.compile

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def compile_and_count(module, **kwargs):
        calls.append(kwargs)
        return original(module, backend=backend, **kwargs)

    monkeypatch.setattr(torch.nn.Module, 'compile', compile_and_count)
    torch._dynamo.reset()
    yield calls, graphs
    torch._dynamo.reset()


def test_compile_is_static_and_validation_without_ema_compiles_nothing(tmp_path, data, counting_compile):  # noqa
    calls, graphs = counting_compile
    model = build_model(_model_opt(data, tmp_path, compile=True, ema_decay=0))
    assert calls == [{'dynamic': False}] and not hasattr(model, 'net_g_ema')
    for size in ((24, 40), (16, 16), (20, 12)):  # validation images of several sizes, through the compiled net_g
        model.feed_data({'lq': torch.rand(1, 3, *size)})
        model.test()
        assert model.output.shape == (1, 3, *size)
    assert graphs == []  # each size would otherwise be traced and compiled (dynamic=False: one graph per shape)


def test_bench_compiles_static_shapes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda module, **kwargs: calls.append(kwargs))
    args = argparse.Namespace(threads=1, device='cpu', channels_last=False, compile=True, amp='none', warmup=0,
                              repeats=1)
    row = bench.measure(dict(NETWORK), {}, args, (1, 3, 16, 16), (2, 3, 24, 24), flops=False)
    assert calls == [{'dynamic': False}] and row['train_ms'] > 0


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """``torch.cuda`` of a machine with two GPUs (cuda:0 Ampere, cuda:1 Volta), recording what is called."""
    calls = []
    capability = {0: (8, 0), 1: (7, 0)}

    def index(device):
        return 0 if device is None or torch.device(device).index is None else torch.device(device).index

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)  # bench.use_device sets it: restored afterwards
    for name in ('synchronize', 'reset_peak_memory_stats', 'set_device'):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name: calls.append((name, index(device))))
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda device=None: calls.append(
        ('max_memory_allocated', index(device))) or 3 * bench.MIB)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability[index(device)])
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: ['A100', 'Tesla V100'][index(device)])
    return calls


def test_bench_on_gpu_1_synchronises_and_measures_memory_there(two_fake_gpus):
    gpu1 = torch.device('cuda:1')
    bench.use_device(gpu1)
    bench._median_seconds(lambda: None, warmup=0, repeats=2, device=gpu1)
    bench.reset_peak_memory(gpu1)
    assert bench.peak_memory_mib(gpu1) == 3
    assert set(two_fake_gpus) == {('set_device', 1), ('synchronize', 1), ('reset_peak_memory_stats', 1),
                                  ('max_memory_allocated', 1)}
    assert bench.bf16_notice(torch.device('cuda:0')) is None
    assert bench.bf16_notice(gpu1) == ('note: Tesla V100 (cuda:1) has no native bf16: --amp bf16 is emulated and '
                                       'slow on it; --amp fp16 measures its fast path')
    with pytest.raises(SystemExit):
        bench.main(['--device', 'cuda:2'])


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 sse\n\nprocessor\t: 1\n'
                       'flags\t\t: fpu avx512f avx512_bf16 sse\n')
    assert precision.cpu_bf16_flags(str(cpuinfo)) == ('avx512_bf16',)
    cpuinfo.write_text('flags\t\t: fpu avx2 amx_bf16\n')
    assert precision.cpu_bf16_flags(str(cpuinfo)) == ('amx_bf16',)
    cpuinfo.write_text('flags\t\t: fpu avx2 avx512f\n')
    assert precision.cpu_bf16_flags(str(cpuinfo)) == ()
    assert precision.cpu_bf16_flags(str(tmp_path / 'missing')) == ()
    assert 'expected one of' in precision.amp_problem(torch.device('cpu'), 'fp8')


def test_memory_format_is_channels_last_on_the_cpu_only():
    """The CPU runs channels_last (oneDNN's layout); CUDA keeps the contiguous layout."""
    assert precision.memory_format(torch.device('cpu')) == torch.channels_last
    assert precision.memory_format(torch.device('cuda')) == torch.contiguous_format
