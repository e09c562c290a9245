"""Option files: read safely with BasicSR's semantics, checked against the machine before anything is written."""
import os
import re
import sys
import textwrap
from collections import OrderedDict

import pytest
import torch
import yaml

import basicsr.test
import basicsr.train
from datprl_arch import options, train
from basicsr.utils import options as basicsr_options
from datprl_arch.options import OptionFileError

BENIGN = """\
name: demo
num_gpu: auto
manual_seed: 0
datasets:
  train:
    name: t
    dataroot_gt: ~/gt
  val_1: {name: v, dataroot_lq: ~}
path: {resume_state: ~}
logger: {use_tb_logger: false}
train:
  lr: !!float 2e-4
  weight_decay: 1e-4
  milestones: [10, 20]
  total_iter: 8
"""

#: A complete training option file (BENIGN above exercises the loader only; parsing validates the whole file).
VALID = """\
name: demo
model_type: SRModel
num_gpu: auto
manual_seed: 0
datasets:
  train:
    name: t
    type: PairedImageDataset
    dataroot_gt: ~/gt
    dataroot_lq: ~/lq
    io_backend: {type: disk}
    gt_size: 16
    batch_size_per_gpu: 2
    num_worker_per_gpu: 0
  val_1: {name: v, type: PairedImageDataset, dataroot_gt: ~/gt, dataroot_lq: ~/lq, io_backend: {type: disk}}
network_g: {type: PaddedRestormer, dim: 8}
path: {resume_state: ~}
logger: {print_freq: 1, save_checkpoint_freq: 4, use_tb_logger: false}
train:
  optim_g: {type: Adam, lr: !!float 2e-4, weight_decay: 0}
  scheduler: {type: MultiStepLR, milestones: [10, 20], gamma: 0.5}
  total_iter: 8
  pixel_opt: {type: L1Loss, loss_weight: 1.0}
val: {val_freq: 4, save_img: false}
"""


def write(tmp_path, text, name='opt.yml'):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def parse(monkeypatch, path, *flags, is_train=True):
    """``basicsr.train.parse_options`` (the installed wrapper) on a command line ``-opt path flags``."""
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', path, *flags])
    parse_options = basicsr.train.parse_options if is_train else basicsr.test.parse_options
    return parse_options(os.getcwd(), is_train)[0]


def evil(tmp_path):
    sentinel = tmp_path / 'PWNED'
    return write(tmp_path, f"""\
        name: x
        num_gpu: 0
        datasets: {{}}
        path: {{}}
        hook: !!python/object/apply:os.system ["touch {sentinel}"]
        """, 'evil.yml'), sentinel


def test_safe_loader_keeps_basicsr_semantics(tmp_path):
    path = write(tmp_path, BENIGN)
    with open(path) as f:
        theirs = yaml.load(f, Loader=basicsr_options.ordered_yaml.basicsr_original()[0])
    ours = options.load_option_file(path)
    assert ours == theirs
    assert type(ours) is OrderedDict and type(ours['datasets']['val_1']) is OrderedDict
    assert list(ours['datasets']) == ['train', 'val_1']
    assert ours['train']['lr'] == 2e-4 and ours['train']['weight_decay'] == '1e-4'  # YAML 1.1, as in BasicSR
    assert ours['path']['resume_state'] is None and ours['train']['milestones'] == [10, 20]


def test_python_tags_run_code_in_basicsr_but_are_rejected_here(tmp_path, monkeypatch):
    path, sentinel = evil(tmp_path)
    with open(path) as f:
        yaml.load(f, Loader=basicsr_options.ordered_yaml.basicsr_original()[0])
    assert sentinel.exists()  # basicsr 1.4.2's loader ran the command
    sentinel.unlink()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['datprl-train', '-opt', path])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    message = str(exit_info.value.code)
    assert message.startswith(f'datprl-train: error: {path}, line 5: ')
    assert "YAML tag '!!python/object/apply:os.system' is not allowed in option files" in message
    assert not sentinel.exists() and not (tmp_path / 'experiments').exists()

    monkeypatch.setattr(sys, 'argv', ['basicsr/test.py', '-opt', path])  # BasicSR's own parser is safe too
    with pytest.raises(OptionFileError, match='os.system'):
        basicsr_options.parse_options(str(tmp_path), is_train=False)
    assert not sentinel.exists()


@pytest.mark.parametrize('text, expected', [
    ('- a\n- b\n', 'found a list'),
    ('', 'found nothing (the file is empty)'),
    ('just a string\n', 'found a str'),
])
def test_option_file_must_be_a_mapping(tmp_path, monkeypatch, text, expected):
    path = write(tmp_path, text)
    pattern = rf'^{re.escape(path)}: an option file must be a YAML mapping .* {re.escape(expected)}'
    with pytest.raises(OptionFileError, match=pattern):
        parse(monkeypatch, path)


def test_missing_option_file_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionFileError, match=r"Option file 'nope.yml' does not exist; relative paths start from "):
        parse(monkeypatch, 'nope.yml')
    with pytest.raises(OptionFileError, match=r"Option file '.*' is a directory"):
        parse(monkeypatch, str(tmp_path))


def test_parse_keeps_basicsr_flags_and_resolves_num_gpu_auto(tmp_path, monkeypatch):
    opt = parse(monkeypatch, write(tmp_path, VALID), '--debug', '--force_yml', 'train:total_iter=5')
    assert opt['num_gpu'] == torch.cuda.device_count()
    assert opt['name'] == 'debug_demo' and opt['train']['total_iter'] == 5 and opt['logger']['print_freq'] == 1
    assert opt['datasets']['train']['dataroot_gt'] == os.path.expanduser('~/gt')
    assert opt['path']['experiments_root'] == os.path.join(os.getcwd(), 'experiments', 'debug_demo')


def test_num_gpu_beyond_the_machine_names_the_option_and_the_fix(tmp_path, monkeypatch):
    too_many = torch.cuda.device_count() + 1
    path = write(tmp_path, VALID.replace('num_gpu: auto', f'num_gpu: {too_many}'))
    for is_train in (True, False):
        with pytest.raises(OptionFileError) as err:
            parse(monkeypatch, path, is_train=is_train)
        assert str(err.value).startswith(f'{path}: num_gpu: {too_many}, but ')
        assert 'Set `num_gpu: auto`' in str(err.value) and '`num_gpu: 0` (CPU)' in str(err.value)
    with pytest.raises(OptionFileError, match=r"num_gpu: 'two' is not valid; use 'auto' or an integer >= 0"):
        parse(monkeypatch, write(tmp_path, VALID.replace('num_gpu: auto', 'num_gpu: two'), 'two.yml'))


def test_tensorboard_logger_without_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    path = write(tmp_path, VALID.replace('use_tb_logger: false', 'use_tb_logger: true'))
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(OptionFileError) as err:
        parse(monkeypatch, path)
    assert str(err.value).startswith(f'{path}: logger.use_tb_logger is true but TensorBoard cannot be imported')
    assert '`pip install tensorboard`' in str(err.value) and 'use_tb_logger: false' in str(err.value)
    assert parse(monkeypatch, path, '--debug')['name'] == 'debug_demo'  # BasicSR writes no TensorBoard in debug
    assert parse(monkeypatch, path, is_train=False)['name'] == 'demo'  # nor when testing
