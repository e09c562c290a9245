"""Restoring users' images: tiling and blending, the shared whole-image prompt, and the datprl-restore command."""
import hashlib
import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from basicsr.archs import build_network
from basicsr.utils import get_root_logger, img2tensor
from datprl_arch.archs.prompt import PromptedBlock
from datprl_arch.data.image_io import ImageFormat, tensor_to_stored
from datprl_arch.inference.restore import Restorer
from datprl_arch.inference.tiling import SEAM_MARGIN_FRACTION, blend_weights, plan_tiles, tiled_apply
from datprl_arch.restore import main
from datprl_arch.utils import precision

from networks import TINY, TINY_NAF

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RESTORMER = dict(type='Restormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1)
CONV_LAYERS = 3  # three 3x3 convolutions: receptive-field radius 3
BF16_MAX_LEVELS = 4  # largest bf16-vs-fp32 difference of an 8-bit output allowed, in grey levels


def tiny(config, seed=0):
    torch.manual_seed(seed)
    return build_network(dict(config)).eval()


def conv_net(channels=2):
    torch.manual_seed(0)
    layers = []
    for _ in range(CONV_LAYERS):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh()]
    return nn.Sequential(*layers).eval()


# ------------------------------------------------------------------------------------------------ blending
@pytest.mark.parametrize('height, width, tile, overlap', [
    (5, 7, 16, 4),  # image smaller than a tile
    (37, 50, 16, 4),  # sides not a multiple of the stride
    (64, 64, 16, 0),
    (33, 100, 24, 12),
    (20, 19, 8, 7),  # stride 1
    (1, 1, 1, 0),
])
def test_blend_weights_sum_to_one(height, width, tile, overlap):
    total = torch.zeros(height, width, dtype=torch.float64)
    for t, weight in blend_weights(height, width, tile, overlap):
        assert (t.height, t.width) == (min(tile, height), min(tile, width))
        assert t.top + t.height <= height and t.left + t.width <= width
        assert weight.shape == (t.height, t.width) and (weight >= 0).all()
        total[t.rows, t.cols] += weight
    assert (total - 1).abs().max() < 1e-6


def test_seam_margin_is_discarded_and_borders_kept():
    (first, w0), (second, w1) = blend_weights(10, 24, 16, 8)  # one row of two tiles overlapping by 8
    margin = int(8 * SEAM_MARGIN_FRACTION)
    assert (first.left, second.left) == (0, 8) and margin == 2
    assert (w0[:, -margin:] == 0).all() and (w1[:, :margin] == 0).all()  # the tile edges lack context
    assert (w0[:, :8 + margin] == 1).all() and (w1[:, 8 - margin:] == 1).all()  # borders, interiors: one tile
    band0, band1 = w0[:, 8 + margin:16 - margin], w1[:, margin:8 - margin]
    assert ((band0 > 0) & (band0 < 1)).all() and torch.allclose(band0 + band1, torch.ones_like(band0))
    assert (band0[:, 1:] < band0[:, :-1]).all()  # a smooth ramp, not a hard seam


def test_tiled_conv_net_matches_untiled():
    net, x = conv_net(), torch.rand(1, 2, 45, 53)
    with torch.no_grad():
        full = net(x)
        exact = tiled_apply(net, x, tile=16, overlap=4 * CONV_LAYERS)  # margin overlap/4 >= the radius
        seamed = tiled_apply(net, x, tile=24, overlap=4)
    assert (exact - full).abs().max() < 1e-6
    assert (seamed - full).abs().max() > 1e-3  # a margin of 1 < radius 3: the seams show
    far = torch.ones(45, 53, dtype=torch.bool)  # pixels farther than the radius from every inner tile edge
    for t in plan_tiles(45, 53, 24, 4):
        for edge in (t.top, t.top + t.height):
            if 0 < edge < 45:
                far[max(0, edge - CONV_LAYERS):edge + CONV_LAYERS] = False
        for edge in (t.left, t.left + t.width):
            if 0 < edge < 53:
                far[:, max(0, edge - CONV_LAYERS):edge + CONV_LAYERS] = False
    assert far.float().mean() > 0.25
    assert (seamed - full)[..., far].abs().max() < 1e-6


# ------------------------------------------------------------------------------------------------ prompts
def record_block_prompts(net):
    """Every prompt a prompted block receives, in call order."""
    seen = []

    def hook(module, args):
        if len(args) > 1 and args[1] is not None:
            seen.append(args[1].detach().clone())

    for module in net.modules():
        if isinstance(module, PromptedBlock):
            module.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize('config', [TINY, TINY_NAF], ids=['restormer', 'nafnet'])
def test_every_tile_gets_the_whole_image_prompt(config):
    net, x = tiny(config), torch.rand(1, 3, 40, 48)
    restorer = Restorer(net, torch.device('cpu'), tile=16, overlap=8)  # the network in the restorer's layout
    x_net = x.contiguous(memory_format=restorer.memory_format)
    with torch.no_grad():
        whole = net.compute_prompt(x_net)
        net(x_net)
        assert torch.equal(net.prompt_state.prompt, whole)  # what an untiled forward uses
        own = net.compute_prompt(x_net[..., :16, :16])
    assert (own - whole).abs().max() > 1e-4  # a tile alone would retrieve another prompt
    seen = record_block_prompts(net)
    out, side = restorer(x)
    tiles = plan_tiles(40, 48, 16, 8)
    blocks = sum(isinstance(m, PromptedBlock) and m.prompt_members != () for m in net.modules())
    assert side == 16 and out.shape == x.shape and len(tiles) == 20
    assert len(seen) == len(tiles) * blocks
    for prompt in seen:
        assert torch.equal(prompt, whole)


def test_fixed_prompt_changes_nothing_else():
    net, x = tiny(TINY), torch.rand(2, 3, 24, 16)
    with torch.no_grad():
        plain = net(x)
        state = net.prompt_state
        with net.fixed_prompt(net.compute_prompt(x)):
            fixed = net(x)
        assert net.prompt_state.prompt.shape == (2, net.prompt_width)
        assert torch.allclose(fixed, plain, atol=1e-6)
        after = net(x[:1])  # retrieval again after the block
    assert net.prompt_state is not state and net.prompt_state.prompt.shape[0] == 1
    assert torch.allclose(after, plain[:1], atol=1e-6)
    with pytest.raises(ValueError, match=r'shape \[B, 32\]'):
        with net.fixed_prompt(torch.zeros(1, 5)):
            pass
    with pytest.raises(ValueError, match='without its prompt system'):
        tiny(dict(TINY, use_prompt=False)).compute_prompt(x)


def test_compute_prompt_skips_the_decoder_and_large_images_use_a_view():
    net = tiny(TINY)
    decoded, inputs = [], []
    net.refinement[0].register_forward_pre_hook(lambda m, a: decoded.append(1))
    net.register_forward_pre_hook(lambda m, a: inputs.append(a[0].shape[-2:]))
    restorer = Restorer(net, torch.device('cpu'), overlap=8, max_pixels=1024)
    assert restorer.auto_tile == 32
    out, side = restorer(torch.rand(1, 3, 40, 96))
    assert side == 32 and out.shape == (1, 3, 40, 96)
    view = inputs[0]
    assert view[0] * view[1] <= 1024 and view[1] < 96  # the prompt's view, downscaled to the pixel bound
    assert len(decoded) == len(inputs) - 1 == len(plan_tiles(40, 96, 32, 8))  # no decoder for the prompt


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture
def checkpoint(tmp_path):
    """A tiny DATPRLRestormer saved as DATPRLModel.save_network does; ``params`` are decoys, so a result made
    with them would not match."""
    ema, decoy = tiny(TINY, seed=0), tiny(TINY, seed=1)
    path = tmp_path / 'net_g_latest.pth'
    torch.save({'params': decoy.state_dict(), 'params_ema': ema.state_dict(), 'network_g': dict(TINY)}, path)
    return str(path), ema


#: The device of the restores compared with ``expected`` (computed on the CPU): a GPU's convolutions differ in the low
#: bits (and run in TF32 by default), so a CUDA machine would fail these comparisons for no CUDA bug.
CPU = 'cpu'


def expected(net, stored, fmt):
    """What restoring ``stored`` (BGR, HxW or HxWxC) with ``net`` must give, computed directly (in the CPU's memory
    format, as the restorer runs it)."""
    img = stored.astype(np.float32) / (255 if stored.dtype == np.uint8 else 65535)
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
    layout = precision.memory_format(torch.device('cpu'))
    with torch.no_grad():
        x = img2tensor(img, bgr2rgb=True, float32=True)[None].contiguous(memory_format=layout)
        return tensor_to_stored(net.to(memory_format=layout)(x), fmt)


def smooth_image(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0] // 8, shape[1] // 8) + shape[2:]).astype(np.float32)
    img = cv2.resize(coarse, shape[1::-1], interpolation=cv2.INTER_LINEAR).reshape(shape)
    return (img * np.iinfo(dtype).max).round().astype(dtype)


def read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture
def log_records():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = get_root_logger()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_restore_8bit_colour_png(tmp_path, checkpoint, capsys):
    ckpt, ema = checkpoint
    img = smooth_image((40, 48, 3), np.uint8)
    cv2.imwrite(str(tmp_path / 'photo.png'), img)
    assert main(['--ckpt', ckpt, '--device', CPU, str(tmp_path / 'photo.png'), str(tmp_path / 'out') + '/']) == 0
    out = read(tmp_path / 'out' / 'photo.png')
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out, expected(ema, img, ImageFormat(8, 3)))  # params_ema, RGB order, 8-bit
    assert '100%' in capsys.readouterr().err  # the progress bar


def test_restore_16bit_gray_png(tmp_path, checkpoint, capsys):
    ckpt, ema = checkpoint
    img = smooth_image((32, 40), np.uint16)
    cv2.imwrite(str(tmp_path / 'slice.png'), img)
    assert main(['--ckpt', ckpt, '--device', CPU, '--quiet', str(tmp_path / 'slice.png'),
                 str(tmp_path / 'restored.png')]) == 0
    out = read(tmp_path / 'restored.png')
    assert out.dtype == np.uint16 and out.shape == img.shape
    assert np.array_equal(out, expected(ema, img, ImageFormat(16, 1)))
    assert capsys.readouterr().err == ''  # --quiet: no progress bar
    assert main(['--ckpt', ckpt, '--quiet', str(tmp_path / 'slice.png'), str(tmp_path / 'restored.jpg')]) == 1
    assert ".jpg cannot store the 16-bit image" in capsys.readouterr().err
    assert not (tmp_path / 'restored.jpg').exists()


def folder_digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def test_restore_folder_keeps_names_skips_corrupt_files_and_tiles_large_images(tmp_path, checkpoint, capsys,
                                                                               log_records):
    ckpt, _ = checkpoint
    src = tmp_path / 'in'
    src.mkdir()
    cv2.imwrite(str(src / 'a.png'), smooth_image((24, 32, 3), np.uint8))
    cv2.imwrite(str(src / 'b.tif'), smooth_image((32, 24), np.uint16))
    cv2.imwrite(str(src / 'large.png'), smooth_image((72, 80, 3), np.uint8))
    (src / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    (src / 'notes.txt').write_text('not an image')
    before = folder_digest(src)
    code = main(['--ckpt', ckpt, '--quiet', '--max-pixels', '2048', '--tile-overlap', '8', str(src),
                 str(tmp_path / 'out')])
    assert code == 1
    assert folder_digest(src) == before
    assert sorted(os.listdir(tmp_path / 'out')) == ['a.png', 'b.tif', 'large.png']
    assert read(tmp_path / 'out' / 'b.tif').dtype == np.uint16 and read(tmp_path / 'out' / 'b.tif').shape == (32, 24)
    assert read(tmp_path / 'out' / 'large.png').shape == (72, 80, 3)
    err = capsys.readouterr().err
    assert '1 of 4 images failed' in err and 'broken.png: truncated or damaged PNG' in err and 'Traceback' not in err
    tiled = [r.getMessage() for r in log_records if 'tiles of' in r.getMessage()]
    assert len(tiled) == 0  # --quiet hides information messages
    assert main(['--ckpt', ckpt, '--max-pixels', '2048', '--tile-overlap', '8', str(src / 'large.png'),
                 str(tmp_path / 'again') + '/']) == 0
    tiled = [r.getMessage() for r in log_records if 'tiles of' in r.getMessage()]
    assert len(tiled) == 1 and 'large.png: 72x80 restored in 6 tiles of 40 pixels' in tiled[0]
    assert np.array_equal(read(tmp_path / 'again' / 'large.png'), read(tmp_path / 'out' / 'large.png'))


def test_restore_never_overwrites_its_inputs(tmp_path, checkpoint):
    ckpt, _ = checkpoint
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image((16, 16, 3), np.uint8))
    before = folder_digest(tmp_path)
    with pytest.raises(SystemExit, match='is the INPUT folder'):
        main(['--ckpt', ckpt, str(tmp_path), str(tmp_path)])
    with pytest.raises(SystemExit, match='a.png is an input file'):
        main(['--ckpt', ckpt, str(tmp_path / 'a.png'), str(tmp_path)])
    assert folder_digest(tmp_path) == before


def test_official_checkpoint_needs_opt(tmp_path):
    net = tiny(TINY_RESTORMER)
    ckpt = str(tmp_path / 'official.pth')
    torch.save({'params': net.state_dict()}, ckpt)
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image((40, 24, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        main(['--ckpt', ckpt, str(tmp_path / 'a.png'), str(tmp_path / 'out') + '/'])
    assert str(exit_info.value).startswith('datprl-restore: error: ')
    assert "no 'network_g' entry" in str(exit_info.value) and '--opt FILE.yml' in str(exit_info.value)
    opt = tmp_path / 'test.yml'
    opt.write_text(yaml.safe_dump({'name': 'x', 'network_g': TINY_RESTORMER}))
    assert main(['--ckpt', ckpt, '--opt', str(opt), '--tile', '16', '--tile-overlap', '4', '--quiet',
                 str(tmp_path / 'a.png'), str(tmp_path / 'out') + '/']) == 0  # a network without prompts, tiled
    assert read(tmp_path / 'out' / 'a.png').shape == (40, 24, 3)
    opt.write_text(yaml.safe_dump({'name': 'x'}))
    with pytest.raises(SystemExit, match='has no network_g'):
        main(['--ckpt', ckpt, '--opt', str(opt), str(tmp_path / 'a.png'), str(tmp_path / 'out') + '/'])


@pytest.mark.parametrize('flags, message', [
    (['--param-key', 'params_x'], "no weights entry 'params_x'"),
    (['--tile', '16', '--tile-overlap', '16'], r'overlap must be in \[0, tile size 16\)'),
    (['--device', 'gpu0'], "device 'gpu0' is not a device name"),
])
def test_bad_options_end_with_one_message(tmp_path, checkpoint, flags, message):
    ckpt, _ = checkpoint
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image((16, 16, 3), np.uint8))
    with pytest.raises(SystemExit, match=message):
        main(['--ckpt', ckpt, *flags, str(tmp_path / 'a.png'), str(tmp_path / 'out') + '/'])


def test_amp_on_the_cpu_needs_native_bf16(tmp_path, checkpoint, monkeypatch):
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image((16, 16, 3), np.uint8))
    args = ['--ckpt', checkpoint[0], '--device', 'cpu', str(tmp_path / 'a.png')]
    with pytest.raises(SystemExit, match='amp fp16: fp16 autocast has no fast path on the CPU'):
        main([*args[:4], '--amp', 'fp16', *args[4:], str(tmp_path / 'fp16.png')])
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda: ())
    with pytest.raises(SystemExit, match=r'amp bf16: this CPU has no native bf16 \(none of avx512_bf16, amx_bf16'):
        main([*args[:4], '--amp', 'bf16', *args[4:], str(tmp_path / 'no.png')])
    assert not (tmp_path / 'no.png').exists()
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda: ('avx512_bf16',))
    assert main([*args, str(tmp_path / 'fp32.png')]) == 0
    assert main([*args[:4], '--amp', 'bf16', *args[4:], str(tmp_path / 'bf16.png')]) == 0
    fp32, bf16 = (cv2.imread(str(tmp_path / f'{n}.png')).astype(int) for n in ('fp32', 'bf16'))
    assert np.abs(fp32 - bf16).max() <= BF16_MAX_LEVELS  # bf16 keeps 8 bits of mantissa: a few 8-bit levels


def test_bad_flag_values_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--ckpt', 'x.pth', '--tile', '0', 'in', 'out'])
    assert exit_info.value.code == 2 and 'argument --tile: expected an integer >= 1, got 0' in capsys.readouterr().err


@pytest.mark.slow
def test_console_command_ends_with_one_message(tmp_path):
    cv2.imwrite(str(tmp_path / 'a.jpg'), smooth_image((24, 24, 3), np.uint8))
    missing = str(tmp_path / 'none.pth')
    done = subprocess.run([sys.executable, '-m', 'datprl_arch.restore', '--ckpt', missing, str(tmp_path / 'a.jpg'),
                           str(tmp_path / 'out') + '/'], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get(
                              'PYTHONPATH')])), OMP_NUM_THREADS='1'), timeout=120)  # keep gpu_check's wheels
    assert done.returncode == 1 and 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines() == [f'datprl-restore: error: checkpoint {missing} does not exist']
    assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------------------------------------------ --task, --blend
EXPLICIT = dict(type='PromptedBackbone', backbone=dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8,
                                                       num_block=2, upscale=1),
                taps={}, inject_after=['body.1'], prompt={'type': 'ExplicitPrompt', 'tasks': ['derain', 'dehaze'],
                                                          'width': 8}, probe_size=16)


@pytest.fixture
def explicit_checkpoint(tmp_path):
    """An ExplicitPrompt network whose fusion is not at the identity (so the prompt shows in the output)."""
    torch.manual_seed(0)
    net = build_network(dict(EXPLICIT)).eval()
    with torch.no_grad():
        for param in net.fusions.parameters():
            param.add_(0.3 * torch.randn_like(param))
    path = tmp_path / 'explicit.pth'
    torch.save({'params': net.state_dict(), 'network_g': dict(EXPLICIT)}, path)
    return str(path), net


def under(net, prompt, stored):
    with net.fixed_prompt(prompt):
        return expected(net, stored, ImageFormat(8, 3))


def test_task_and_blend_restore_under_the_chosen_prompt(tmp_path, explicit_checkpoint):
    ckpt, net = explicit_checkpoint
    img = smooth_image((24, 32, 3), np.uint8)
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    rain, haze = (net.prompt_mode.task_prompt(i).detach() for i in range(2))
    results = {}
    for flags in (['--task', 'derain'], ['--task', 'dehaze'], ['--blend', 'derain:dehaze:0'],
                  ['--blend', 'derain:dehaze:1'], ['--blend', 'derain:dehaze:0.3']):
        out = tmp_path / '_'.join(flags).replace(':', '-')
        assert main(['--ckpt', ckpt, '--device', CPU, *flags, '--quiet', str(tmp_path / 'a.png'), str(out) + '/']) == 0
        results[' '.join(flags)] = read(out / 'a.png')
    assert np.array_equal(results['--task derain'], under(net, rain, img))
    assert np.array_equal(results['--task dehaze'], under(net, haze, img))
    assert not np.array_equal(results['--task derain'], results['--task dehaze'])
    assert np.array_equal(results['--blend derain:dehaze:0'], results['--task derain'])  # the endpoints
    assert np.array_equal(results['--blend derain:dehaze:1'], results['--task dehaze'])
    assert np.array_equal(results['--blend derain:dehaze:0.3'], under(net, 0.7 * rain + 0.3 * haze, img))


def test_blend_of_two_reference_images_uses_their_composed_prompts(tmp_path, checkpoint):
    ckpt, ema = checkpoint  # dual prompt pools
    img, ref_a, ref_b = (smooth_image((16, 24, 3), np.uint8, seed=s) for s in range(3))
    for name, value in (('a', img), ('ref_a', ref_a), ('ref_b', ref_b)):
        cv2.imwrite(str(tmp_path / f'{name}.png'), value)
    blend = f"{tmp_path / 'ref_a.png'}:{tmp_path / 'ref_b.png'}:0.25"
    assert main(['--ckpt', ckpt, '--device', CPU, '--blend', blend, '--quiet', str(tmp_path / 'a.png'),
                 str(tmp_path / 'o') + '/']) == 0
    to_tensor = lambda stored: img2tensor(stored.astype(np.float32) / 255, bgr2rgb=True, float32=True)[None]  # noqa
    with torch.no_grad():
        p_a, p_b = ema.eval().compute_prompt(to_tensor(ref_a)), ema.compute_prompt(to_tensor(ref_b))
    assert np.array_equal(read(tmp_path / 'o' / 'a.png'), under(ema, torch.lerp(p_a, p_b, 0.25), img))


@pytest.mark.parametrize('flags, message', [
    (['--task', 'denoise'], r"task 'denoise' is not a task of this checkpoint \(its tasks: \['derain', 'dehaze'\]\)"),
    (['--blend', 'derain:dehaze'], r'--blend expects A:B:ALPHA'),
    (['--blend', 'derain:dehaze:1.5'], r'ALPHA must lie in \[0, 1\], got 1.5'),
    (['--blend', 'derain:nothing.png:0.5'], r"'nothing.png' is neither a task of this checkpoint \(\['derain', "
                                            r"'dehaze'\]\) nor an image file"),
])
def test_bad_prompt_choices_end_with_one_message(tmp_path, explicit_checkpoint, flags, message):
    ckpt, _ = explicit_checkpoint
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image((16, 16, 3), np.uint8))
    with pytest.raises(SystemExit, match=message):
        main(['--ckpt', ckpt, *flags, str(tmp_path / 'a.png'), str(tmp_path / 'out') + '/'])
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir())


def test_task_needs_a_prompt_per_task(tmp_path, checkpoint, capsys):
    ckpt, _ = checkpoint
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image((16, 16, 3), np.uint8))
    with pytest.raises(SystemExit, match=r"task 'derain': DATPRLRestormer with dual prompt pools has no prompt per "
                                         r'task; task prompts need a checkpoint trained with prompt type '
                                         'ExplicitPrompt or LowRankPrompt'):
        main(['--ckpt', ckpt, '--task', 'derain', str(tmp_path / 'a.png'), str(tmp_path / 'out') + '/'])
    with pytest.raises(SystemExit):
        main(['--ckpt', ckpt, '--task', 'a', '--blend', 'a:b:0', str(tmp_path / 'a.png'), str(tmp_path / 'o')])
    assert 'not allowed with argument' in capsys.readouterr().err


# ------------------------------------------------------------------------------------ damaged, alpha, palette
def test_empty_and_truncated_images_are_named_and_skipped_the_others_restored(tmp_path, checkpoint, capfd):
    """N2/N3: a zero-byte PNG and a PNG cut in half are named (empty; truncated or damaged PNG), without OpenCV's
    assertion or libpng's raw line; the images after them are still restored and the status is 1."""
    ckpt, _ = checkpoint
    src = tmp_path / 'in'
    src.mkdir()
    (src / 'a_zero.png').write_bytes(b'')
    cv2.imwrite(str(src / 'b_ok.png'), smooth_image((16, 24, 3), np.uint8))
    cv2.imwrite(str(src / 'c_ok.png'), smooth_image((16, 16), np.uint16))
    whole = (src / 'b_ok.png').read_bytes()
    (src / 'd_truncated.png').write_bytes(whole[:len(whole) // 2])
    assert main(['--ckpt', ckpt, '--quiet', str(src), str(tmp_path / 'out')]) == 1
    assert sorted(os.listdir(tmp_path / 'out')) == ['b_ok.png', 'c_ok.png']
    err = capfd.readouterr().err
    assert '2 of 4 images failed' in err and 'Traceback' not in err and 'libpng' not in err, err
    assert f"{src / 'a_zero.png'}: empty file (0 bytes); expected an image" in err
    assert f"{src / 'd_truncated.png'}: truncated or damaged PNG" in err
    assert main(['--ckpt', ckpt, '--quiet', str(src / 'a_zero.png'), str(tmp_path / 'alone.png')]) == 1
    err = capfd.readouterr().err
    assert '1 of 1 images failed' in err and 'empty file (0 bytes)' in err and 'Traceback' not in err
    assert not (tmp_path / 'alone.png').exists()


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16], ids=['8bit', '16bit'])
def test_alpha_is_kept_unchanged_beside_the_restored_colour(tmp_path, checkpoint, capsys, dtype):
    """N4: RGBA in, RGBA out; the colour channels are restored as for an RGB image, the alpha bytes are identical."""
    ckpt, ema = checkpoint
    colour = smooth_image((16, 24, 3), dtype)
    alpha = smooth_image((16, 24), dtype, seed=5)
    cv2.imwrite(str(tmp_path / 'rgba.png'), np.dstack([colour, alpha]))
    assert main(['--ckpt', ckpt, '--quiet', str(tmp_path / 'rgba.png'), str(tmp_path / 'out') + '/']) == 0
    out = read(tmp_path / 'out' / 'rgba.png')
    assert out.dtype == dtype and out.shape == (16, 24, 4)
    assert out[..., 3].tobytes() == alpha.tobytes()
    assert np.array_equal(out[..., :3], expected(ema, colour, ImageFormat(8 * np.dtype(dtype).itemsize, 3)))
    assert main(['--ckpt', ckpt, '--quiet', str(tmp_path / 'rgba.png'), str(tmp_path / 'rgba.jpg')]) == 1
    err = capsys.readouterr().err
    what = 'alpha channel' if dtype == np.uint8 else '16-bit image'  # the bit depth is checked first
    assert f'.jpg cannot store the {what}' in err and 'Traceback' not in err


def test_palette_png_is_expanded_and_said_so(tmp_path, checkpoint, log_records):
    """N7: a 16-colour palette PNG is restored in 8-bit RGB, with an information line saying it was expanded."""
    from PIL import Image

    ckpt, ema = checkpoint
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 16, (16, 16)).astype(np.uint8)
    image = Image.fromarray(indices, 'P')
    image.putpalette(rng.integers(0, 256, 16 * 3).astype(np.uint8).tolist())
    image.save(tmp_path / 'palette.png')
    assert main(['--ckpt', ckpt, str(tmp_path / 'palette.png'), str(tmp_path / 'out') + '/']) == 0
    out = read(tmp_path / 'out' / 'palette.png')
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert np.array_equal(out, expected(ema, read(tmp_path / 'palette.png'), ImageFormat(8, 3)))
    said = [r.getMessage() for r in log_records if 'palette PNG' in r.getMessage()]
    assert said == [f"{tmp_path / 'palette.png'}: palette PNG expanded to 8-bit RGB; the result is written in full "
                    'colour, not as a palette image']


def test_opt_that_conflicts_with_the_checkpoints_network_names_the_differing_keys(tmp_path, checkpoint, capsys,
                                                                                  log_records):
    """N19: --opt replaces the network_g the checkpoint carries; when they differ, the message names the conflict
    and the differing keys (an error when the weights do not fit, a warning when they do)."""
    ckpt, _ = checkpoint
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image((16, 16, 3), np.uint8))
    opt = tmp_path / 'other.yml'
    opt.write_text(yaml.safe_dump({'name': 'x', 'network_g': dict(TINY, degradation_pool_size=5)}))
    with pytest.raises(SystemExit) as exit_info:
        main(['--ckpt', ckpt, '--opt', str(opt), str(tmp_path / 'a.png'), str(tmp_path / 'out') + '/'])
    message = str(exit_info.value)
    assert message.startswith(f'datprl-restore: error: the network_g of {opt} differs from the network_g that '
                              f'{ckpt} carries (option file vs checkpoint: degradation_pool_size: 5 vs 7)'), message
    assert 'drop --opt' in message and 'does not fit' not in message
    opt.write_text(yaml.safe_dump({'name': 'x', 'network_g': dict(TINY, degradation_top_k=1)}))
    assert main(['--ckpt', ckpt, '--opt', str(opt), '--quiet', str(tmp_path / 'a.png'),
                 str(tmp_path / 'out') + '/']) == 0
    warned = [r.getMessage() for r in log_records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and 'degradation_top_k: 1 vs 2' in warned[0] and 'the weights fit' in warned[0]
    assert 'Traceback' not in capsys.readouterr().err


def test_blend_of_a_name_that_is_no_file_says_why_task_names_do_not_apply(tmp_path, checkpoint):
    """N23: on a checkpoint without a prompt per task, the message is a whole sentence saying why 'foo' is neither."""
    ckpt, _ = checkpoint
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image((16, 16, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        main(['--ckpt', ckpt, '--blend', 'foo:bar:0.5', str(tmp_path / 'a.png'), str(tmp_path / 'out') + '/'])
    assert str(exit_info.value) == (
        "datprl-restore: error: --blend: 'foo' is neither an image file nor a task name of this checkpoint: "
        'DATPRLRestormer with dual prompt pools has no prompt per task, so A and B must be reference image files '
        '(task names need a checkpoint trained with prompt type ExplicitPrompt or LowRankPrompt)')
