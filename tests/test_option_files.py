"""Every option file under options/ loads with the runners' option parsing and builds: its network, every dataset
on generated stand-in data, and the model (one training step for train files, checkpoint loading for test files).

A new option file is covered automatically. Stand-in data mirror each source of the file: its storage (folder or
LMDB), bit depth (medical sources: 16-bit grayscale; others: 8-bit colour), scale and file-name template, shared
GT folders stay shared. Full-size networks are checked against the released checkpoints' key lists on the 'meta'
device; the model is built with the network shrunk (same type and prompt options) to keep this file fast.
"""
import glob
import itertools
import json
import os
import re
import sys
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import basicsr.test
import basicsr.train
from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.models import build_model
from datprl_arch.data.lmdb.writer import write_lmdb
from datprl_arch.options import load_option_file
from datprl_arch.priors.encoders import encode_files, hash_encoder
from datprl_arch.tools.encode_descriptions import default_source

from networks import TINY_BACKBONE
from toy import random_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')
OPTION_FILES = sorted(os.path.relpath(p, ROOT)
                      for p in glob.glob(os.path.join(ROOT, 'options', '**', '*.yml'), recursive=True))
STANDIN_IMAGES = 2  # image pairs per stand-in folder
MIN_SIDE = 32  # GT side of stand-ins when no training crop asks for more
GRAYSCALE_16BIT_DOMAINS = ('medical',)  # stand-ins of these domains are 16-bit grayscale, others 8-bit colour
SMALL_NETWORK = 5_000_000  # parameters; larger networks are shrunk for the model build
SHRUNK = TINY_BACKBONE
STEP_CROP = 32  # the training step runs on this corner of the batch's crops
TEXT_EMBEDDING_DIM = 1024  # CLIP RN50's text width, as the real priors files have
EXPONENT_FLOAT = re.compile(r'^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$')

# released checkpoints: these files' networks must have exactly the released keys, shapes and parameter count
RELEASED = {'6t': ('state_dict_6t.txt', 53_133_552), 'cdd11': ('state_dict_cdd11.txt', 42_563_115)}
RELEASED_FILES = {
    'options/train/datprl_6t.yml': '6t', 'options/train/datprl_9t.yml': '6t', 'options/test/datprl_6t.yml': '6t',
    'options/train/datprl_cdd11.yml': 'cdd11', 'options/test/datprl_cdd11.yml': 'cdd11',
    'options/train/datprl_natural_3t.yml': 'cdd11', 'options/train/datprl_natural_5t.yml': 'cdd11',
    'options/test/datprl_natural_3t.yml': 'cdd11', 'options/test/datprl_natural_5t.yml': 'cdd11'}

PROMPT_6T = {'train.prompt_lr': 4e-4, 'train.use_amp': True, 'train.grad_clip': 1.0,
             'train.use_clip_constraint': True, 'train.clip_alignment_weight': 1.0,
             'train.prompt_diversity_weight': 1.0, 'train.diversity_temperature': 0.1,
             'train.prompt_balance_weight': 0.1, 'train.stats_update_freq': 5000,
             'train.prompt_contrastive_weight': 0.1}
RECIPE_6T = {'model_type': 'MultiModalSRv3Model', 'train.optim_g.type': 'Adam', 'train.optim_g.lr': 4e-4,
             'train.optim_g.betas': [0.9, 0.99], 'train.scheduler.type': 'CosineAnnealingRestartLR',
             'train.scheduler.periods': [1_000_000], 'train.scheduler.eta_min': 1e-6, 'train.total_iter': 1_000_000,
             'datasets.train.batch_size_per_gpu': 12, 'datasets.train.gt_size': 128,
             'train.pixel_opt.type': 'L1Loss', 'train.fft_opt.loss_weight': 0.1, 'val.val_freq': 1e4, **PROMPT_6T}
RECIPE_NATURAL = {'train.optim_g.type': 'AdamW', 'train.optim_g.lr': 2e-4, 'train.optim_g.weight_decay': 0.01,
                  'train.scheduler.type': 'CosineAnnealingRestartLR', 'train.scheduler.eta_min': 0,
                  'train.fft_opt.loss_weight': 0.1, 'datasets.train.sampling': 'concat',
                  'network_g.type': 'DualPromptRestormerv3_only_task_prompt'}
RECIPES = {
    'options/train/datprl_6t.yml': dict(RECIPE_6T, **{'datasets.train.datasets.name': [
        'DF2K', 'UCMerced', 'IXI', 'Rain100L', 'CUHK-CR1', 'AAPM']}),
    'options/train/datprl_9t.yml': dict(RECIPE_6T, **{'datasets.train.datasets.name': [
        'DF2K', 'UCMerced', 'IXI', 'Rain100L', 'CUHK-CR1', 'AAPM', 'GoPro', 'PET', 'RICE1']}),
    'options/train/datprl_cdd11.yml': {
        'train.optim_g.type': 'Adam', 'train.optim_g.lr': 2e-4, 'train.scheduler.type': 'MultiStepLR',
        'train.scheduler.milestones': [200_000, 400_000, 600_000, 800_000], 'train.scheduler.gamma': 0.5,
        'train.total_iter': 1_000_000, 'datasets.train.batch_size_per_gpu': 5, 'train.fft_opt.loss_weight': 0.1,
        'datasets.train.datasets.dataroot_gt': ['datasets/CDD-11/train/clear'] * 11},
    'options/train/datprl_natural_3t.yml': dict(RECIPE_NATURAL, **{'datasets.train.datasets.name': [
        'denoise_sigma15', 'denoise_sigma25', 'denoise_sigma50', 'Rain100L', 'OTS']}),
    'options/train/datprl_natural_5t.yml': dict(RECIPE_NATURAL, **{'datasets.train.datasets.name': [
        'denoise_sigma15', 'denoise_sigma25', 'denoise_sigma50', 'Rain100L', 'OTS', 'GoPro', 'LOL']}),
}


@pytest.fixture
def one_thread():
    """The tiny networks here run faster on one thread, and far faster when other processes load the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def naming(path):
    """Any failure inside names the option file first."""
    try:
        yield
    except Exception as err:
        raise AssertionError(f'{path}: {type(err).__name__}: {err}') from err


def is_train_file(raw):
    return 'train' in raw['datasets']


def parse(path, root, monkeypatch):
    """The option dict exactly as BasicSR's train/test runner parses ``-opt path`` (experiments under ``root``)."""
    raw = load_option_file(os.path.join(ROOT, path))
    monkeypatch.setattr(sys, 'argv', ['datprl', '-opt', os.path.join(ROOT, path)])
    runner = basicsr.train if is_train_file(raw) else basicsr.test
    return runner.parse_options(str(root), is_train_file(raw))[0]


def sources(opt):
    """``(phase key, dataset options, source entry)`` of every source of every dataset."""
    return [(key, ds, src) for key, ds in opt['datasets'].items() for src in ds['datasets']]


# ------------------------------------------------------------------------------------------------ stand-in data
class StandIns:
    """Tiny real images replacing every data path of a parsed option file (rewritten in place)."""

    def __init__(self, root, side):
        self.root, self.side = str(root), side
        self.rng = np.random.default_rng(0)
        self.made, self.serial = {}, itertools.count()
        self.names = [f'img{i:03d}' for i in range(STANDIN_IMAGES)]

    def _path(self, kind):
        return os.path.join(self.root, f'{next(self.serial):03d}_{kind}')

    def _once(self, key, make):
        """What ``make()`` returned for ``key`` (a role and the original path): shared paths stay shared."""
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]

    def _stored(self, folder, lmdb):
        """The folder, or an LMDB of it keyed by file stem (LQ stand-ins carry their GT's names)."""
        if not lmdb:
            return folder
        items = [(os.path.splitext(f)[0], os.path.join(folder, f)) for f in sorted(os.listdir(folder))]
        write_lmdb(items, folder + '.lmdb')
        return folder + '.lmdb'

    def _gt(self, src):
        folder = self._path('gt')
        os.makedirs(folder)
        bits, channels = (16, 1) if src['domain'] in GRAYSCALE_16BIT_DOMAINS else (8, 3)
        for name in self.names:
            img = random_image(self.rng, self.side, self.side, channels, bits)
            cv2.imwrite(os.path.join(folder, name + '.png'), img)
        return folder, self._stored(folder, src['io_backend']['type'] == 'lmdb')

    def _lq(self, src, gt_folder):
        folder = self._path('lq')
        os.makedirs(folder)
        scale, lmdb = int(src.get('scale', 1)), src['io_backend']['type'] == 'lmdb'
        tmpl = '{}' if lmdb else src.get('filename_tmpl', '{}')
        for name in self.names:
            gt = cv2.imread(os.path.join(gt_folder, name + '.png'), cv2.IMREAD_UNCHANGED)
            side = self.side // scale
            lq = cv2.resize(gt, (side, side), interpolation=cv2.INTER_AREA) if scale > 1 else gt // 2
            cv2.imwrite(os.path.join(folder, tmpl.format(name) + '.png'), lq)
        return self._stored(folder, lmdb)

    def source(self, src):
        gt_folder, gt_root = self._once(('gt', src['dataroot_gt'], src['io_backend']['type']), lambda: self._gt(src))
        if src.get('mode') not in ('noise', 'synth'):  # these sources make their LQ from the GT
            src['dataroot_lq'] = self._once(('lq', src['dataroot_lq'], src['io_backend']['type'],
                                             src.get('scale', 1)), lambda: self._lq(src, gt_folder))
        src['dataroot_gt'] = gt_root
        if src.get('meta_info_file'):
            src['meta_info_file'] = self._once(('meta', src['meta_info_file']), self._meta_info)
        if src.get('descriptions'):
            src['descriptions'] = self.descriptions(src['name'])

    def _meta_info(self):
        path = self._path('meta_info') + '.txt'
        with open(path, 'w') as f:
            f.writelines(f'{name}.png ({self.side},{self.side},3)\n' for name in self.names)
        return path

    def descriptions(self, source_name):
        def make():
            path = self._path('descriptions') + '.json'
            with open(path, 'w') as f:
                json.dump({f'{n}.png': f'{source_name}: a stand-in image {n}' for n in self.names}, f)
            return path
        return self._once(('descriptions', source_name), make)

    def text_embeddings(self, train_sources):
        path = self._path('texts') + '.pt'
        files = [(src['name'], self.descriptions(src['name'])) for src in train_sources]
        encode_files(files, hash_encoder(TEXT_EMBEDDING_DIM), 'hash').save(path)
        return path


def standin_side(opt):
    crops = [int(ds.get('gt_size') or 0) for ds in opt['datasets'].values()]
    side = max([MIN_SIDE] + crops)
    return side + (-side) % 4  # divisible by every SR scale


def replace_data(opt, root):
    """Point every data path of ``opt`` (datasets, text priors) at stand-ins under ``root``."""
    standins = StandIns(root, standin_side(opt))
    for _, _, src in sources(opt):
        standins.source(src)
    train_opt = opt.get('train') or {}
    if train_opt.get('text_embeddings'):
        train_opt['text_embeddings'] = standins.text_embeddings(opt['datasets']['train']['datasets'])
    if train_opt.get('text_description_paths'):
        train_opt['text_description_paths'] = [standins.descriptions(s['name'])
                                               for s in opt['datasets']['train']['datasets']]
        train_opt['text_encoder'] = 'hash'
    return standins


# ------------------------------------------------------------------------------------------------ networks
#: BasicSR networks of the option files whose constructors need real tensors (SwinIR's drop-path schedule), small.
BASICSR_SMALL = ('SwinIR', 'RRDBNet', 'EDSR')


def meta_network(network_opt):
    with torch.device('meta'):
        return build_network(dict(network_opt))


def shrunk(network_opt):
    """The file's network when small, else the same type and prompt options on a tiny backbone. Networks wrapped
    by PromptedBackbone are small and are probed by a forward at construction, which the meta device cannot run."""
    if network_opt['type'] == 'PromptedBackbone' or network_opt['type'] in BASICSR_SMALL:
        return dict(network_opt)
    if sum(p.numel() for p in meta_network(network_opt).parameters()) <= SMALL_NETWORK:
        return dict(network_opt)
    return dict(network_opt, **SHRUNK)


def read_key_list(name):
    with open(os.path.join(DATA, name)) as f:
        return [tuple(line.split()) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------ tests
def check_datasets(opt):
    """Build every dataset and read from it; labels and formats must be those the file declares."""
    built = {}
    for key, ds_opt in opt['datasets'].items():
        dataset = build_dataset(ds_opt)
        built[key] = dataset
        if ds_opt['phase'] == 'train':
            batch = dataset.__getitems__(list(range(int(ds_opt['batch_size_per_gpu']))))
            side = int(ds_opt['gt_size'])
            weights = {s['name']: float(s.get('weight', 1.0)) for s in ds_opt['datasets']}
            due = {n for n, w in weights.items() if w / sum(weights.values()) * len(batch) >= 1}  # >= 1 per batch
            if ds_opt.get('sampling', 'balanced') == 'balanced':
                assert due <= {item['source_name'] for item in batch}, 'a balanced batch misses a source'
        else:
            batch = [dataset[i] for i in range(len(dataset))]
            side = standin_side(opt)
            assert len(dataset) == STANDIN_IMAGES * len(ds_opt['datasets'])
        by_name = {s['name']: s for s in ds_opt['datasets']}
        for item in batch:
            src = by_name[item['source_name']]
            assert item['lq'].shape == item['gt'].shape == (int(ds_opt.get('channels', 3)), side, side), key
            assert (item['domain_name'], item['task_name']) == (src['domain'], src['task']), key
            assert item['bit_depth'] == (16 if src['domain'] in GRAYSCALE_16BIT_DOMAINS else 8), key
    return built


def expected_terms(train_opt, network):
    terms = {'l_pix'} | ({'l_fft'} if train_opt.get('fft_opt') else set())
    if train_opt.get('prompt_diversity_weight'):
        terms.add('l_div')
    if train_opt.get('prompt_balance_weight'):
        terms.add('l_bal')
    if train_opt.get('prompt_contrastive_weight'):
        terms |= {'l_con', 'l_con_dom'} if hasattr(network, 'domain_prompt_pool') else {'l_con'}
    if train_opt.get('use_clip_constraint'):
        terms.add('l_align')
    return terms


def check_training_model(opt, datasets):
    """The model builds from the file's train section; one step on a real batch gives every configured loss."""
    model = build_model(opt)
    net = model.get_bare_model(model.net_g)
    groups = [g.get('name') for g in model.optimizer_g.param_groups]
    if opt['train'].get('prompt_lr') is not None and getattr(net, 'use_prompt', False):
        assert 'prompts' in groups and 'backbone' in groups, groups
    ds_opt = opt['datasets']['train']
    train_set = datasets['train']
    batch = default_collate(train_set.__getitems__(list(range(int(ds_opt['batch_size_per_gpu'])))))
    batch.update(lq=batch['lq'][..., :STEP_CROP, :STEP_CROP], gt=batch['gt'][..., :STEP_CROP, :STEP_CROP])
    model.feed_data(batch)
    model.optimize_parameters(1)
    logged = model.get_current_log()
    missing = expected_terms(opt['train'], net) - set(logged)
    assert not missing, f'losses {sorted(missing)} configured but not computed (logged: {sorted(logged)})'
    assert all(np.isfinite(float(v)) for v in logged.values()), logged


def standin_checkpoint(path_opt, state):
    """A checkpoint of ``state`` in the format the file expects: a Lightning file for ``.ckpt``, else a BasicSR file
    whose ``param_key_g`` entry holds ``state`` and whose other entry (a training run's ``params`` next to
    ``params_ema``) holds different weights, so loading the wrong key is seen."""
    if path_opt['pretrain_network_g'].endswith('.ckpt'):
        return {'state_dict': {f'net.{k}': v for k, v in state.items()}, 'epoch': 150, 'global_step': 1}
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    return {'params': other, path_opt.get('param_key_g', 'params'): state}


def check_test_model(opt, root):
    """The model loads a checkpoint in the file's format (param_key_g, strict) and restores the weights."""
    state = build_network(dict(opt['network_g'])).state_dict()
    checkpoint = os.path.join(str(root), os.path.basename(opt['path']['pretrain_network_g']))
    torch.save(standin_checkpoint(opt['path'], state), checkpoint)
    opt['path']['pretrain_network_g'] = checkpoint
    model = build_model(opt)
    loaded = model.get_bare_model(model.net_g).state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in state.items()), 'the weights were not loaded'


@pytest.mark.parametrize('path', OPTION_FILES)
def test_option_file_builds(path, tmp_path, monkeypatch, one_thread):
    with naming(path):
        opt = parse(path, tmp_path / 'runner', monkeypatch)
        replace_data(opt, tmp_path)
        datasets = check_datasets(opt)
        opt['network_g'] = shrunk(opt['network_g'])
        if opt['is_train']:
            check_training_model(opt, datasets)
        else:
            check_test_model(opt, tmp_path)


@pytest.mark.parametrize('path', sorted(RELEASED_FILES))
def test_paper_networks_match_the_released_checkpoints(path):
    listing, params = RELEASED[RELEASED_FILES[path]]
    with naming(path):
        net = meta_network(load_option_file(os.path.join(ROOT, path))['network_g'])
        ours = [(k, '[' + ','.join(map(str, v.shape)) + ']') for k, v in net.state_dict().items()]
        assert ours == read_key_list(listing)
        assert sum(p.numel() for p in net.parameters()) == params


def lookup(opt, dotted):
    """Value at ``a.b.c``; through a list of sources, the list of their values."""
    value = opt
    for i, key in enumerate(dotted.split('.')):
        if isinstance(value, list):
            return [lookup(v, '.'.join(dotted.split('.')[i:])) for v in value]
        value = value[key]
    return value


@pytest.mark.parametrize('path', sorted(RECIPES))
def test_paper_recipes(path):
    opt = load_option_file(os.path.join(ROOT, path))
    wrong = {key: lookup(opt, key) for key, value in RECIPES[path].items() if lookup(opt, key) != value}
    assert not wrong, f'{path}: differs from the paper recipe: {wrong}'


@pytest.mark.parametrize('path', [p for p in sorted(RECIPES) if 'natural' in p])
def test_natural_schedules_are_the_truncated_lightning_cosine(path):
    """150 of 180 cosine epochs: total_iter / period = 150 / 180."""
    train = load_option_file(os.path.join(ROOT, path))['train']
    assert train['total_iter'] * 180 == train['scheduler']['periods'][0] * 150, path


def walk(node, where=''):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f'{where}.{key}' if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f'{where}[{i}]')
    else:
        yield where, node


@pytest.mark.parametrize('path', OPTION_FILES)
def test_option_file_conventions(path):
    opt = load_option_file(os.path.join(ROOT, path))
    strings = [f'{where}: {value!r}' for where, value in walk(opt)
               if isinstance(value, str) and EXPONENT_FLOAT.match(value)]
    assert not strings, f'{path}: exponent floats load as strings (write !!float): {strings}'
    assert opt['num_gpu'] == 'auto', path
    assert 'suffix' in opt['val'] and opt['val']['suffix'] is None, f'{path}: set val.suffix: ~'
    if is_train_file(opt):
        assert opt['logger']['use_tb_logger'] is False, path
    names = [ds['name'] for ds in opt['datasets'].values()]
    assert len(set(names)) == len(names), f'{path}: dataset names repeat: {names}'
    vocabularies = {(tuple(ds['domains']), tuple(ds['tasks'])) for ds in opt['datasets'].values()}
    assert len(vocabularies) == 1, f'{path}: every set must declare the same domains/tasks: {vocabularies}'
    domains, tasks = vocabularies.pop()
    for key, _, src in sources(opt):
        assert src['domain'] in domains and src['task'] in tasks, f'{path}: {key}/{src["name"]}'


def described_source(src):
    """The source encode_descriptions gives this source's images: its descriptions file's default, else the data
    folder's (datasets/<benchmark>/descriptions.json, as the paper files' headers encode them)."""
    if src.get('descriptions'):
        return default_source(src['descriptions'])
    return os.path.normpath(src['dataroot_gt']).split(os.sep)[1]


@pytest.mark.parametrize('path', [p for p in OPTION_FILES if
                                  (load_option_file(os.path.join(ROOT, p)).get('train') or {}).get('text_embeddings')])
def test_training_source_names_find_their_text_embeddings(path):
    """The alignment loss looks images up by source name: it must be the name encode_descriptions recorded."""
    train = load_option_file(os.path.join(ROOT, path))['datasets']['train']['datasets']
    assert [s['name'] for s in train] == [described_source(s) for s in train], path


def test_a_broken_option_file_is_reported_with_its_name(tmp_path, monkeypatch, one_thread):
    text = open(os.path.join(ROOT, 'options/demo/md_mini_train.yml')).read()
    bad = tmp_path / 'broken.yml'
    bad.write_text(text.replace('  grad_clip: 1.0\n', '  grad_clip: 1.0\n  prompt_diversty_weight: 1.0\n'))
    with pytest.raises(AssertionError, match=r'(?s)broken\.yml: OptionFileError: .*broken\.yml: 1 problem\(s\).*'
                       r"train\.prompt_diversty_weight: unknown key \(did you mean `prompt_diversity_weight`"):
        test_option_file_builds(str(bad), tmp_path, monkeypatch, None)


def trained_by(test_path):
    """The train option file whose run writes the checkpoint a test file loads (experiments/<name>/...), or None."""
    checkpoint = load_option_file(os.path.join(ROOT, test_path))['path']['pretrain_network_g']
    parts = os.path.normpath(checkpoint).split(os.sep)
    runs = {load_option_file(os.path.join(ROOT, p))['name']: p for p in OPTION_FILES
            if is_train_file(load_option_file(os.path.join(ROOT, p)))}
    return runs.get(parts[1]) if parts[0] == 'experiments' else None


@pytest.mark.parametrize('path', [p for p in OPTION_FILES if not is_train_file(load_option_file(os.path.join(ROOT, p)))
                                  and trained_by(p)])
def test_test_files_load_what_their_training_writes(path):
    """Same network as the run that writes the checkpoint, and its EMA copy exactly when that run keeps one."""
    test_opt, train_path = load_option_file(os.path.join(ROOT, path)), trained_by(path)
    train_opt = load_option_file(os.path.join(ROOT, train_path))
    assert test_opt['network_g'] == train_opt['network_g'], f'{path} vs {train_path}'
    uses_ema = test_opt['path'].get('param_key_g', 'params') == 'params_ema'
    assert uses_ema == (float(train_opt['train'].get('ema_decay', 0)) > 0), f'{path} vs {train_path}: param_key_g'
