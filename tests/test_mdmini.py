"""MD-Mini: pools, split by source image, fixed val/test pairs, the unseen check, fragments, safe overwrites."""
import json
import os
import os.path as osp
import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml

import datprl_arch  # noqa: F401
from datprl_arch import mdmini
from basicsr.data import build_dataloader, build_dataset
from basicsr.data.data_sampler import EnlargedSampler
from datprl_arch.data.lmdb.meta import read_lmdb_meta
from datprl_arch.mdmini import split as mdmini_split
from datprl_arch.mdmini.__main__ import main as mdmini_main
from datprl_arch.mdmini.build import DEFAULT_LIMIT, remove_stale_builds
from datprl_arch.mdmini.split import HELD_OUT_IMAGES
from datprl_arch.mdmini.tasks import CLEAN_WEIGHT

EVERY = mdmini.TASKS + mdmini.CLEAN_TASKS


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('md') / 'md_mini')
    return out, mdmini.build(out, seed=0)


def _high_frequency_energy(img):
    """Spectral energy outside the central half of the frequencies (per channel, summed)."""
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(img.reshape(img.shape[0], img.shape[1], -1), axes=(0, 1)),
                                      axes=(0, 1))) ** 2
    h, w = img.shape[:2]
    spectrum[h // 4:h - h // 4, w // 4:w - w // 4] = 0
    return spectrum.sum()


def _overlap(a, b):
    (ay, ax, ah, aw), (by, bx, bh, bw) = a, b
    return ay < by + bh and by < ay + ah and ax < bx + bw and bx < ax + aw


def test_every_source_has_enough_val_and_test_pairs_and_every_pool_training_blocks(built):
    out, manifest = built
    assert sorted(manifest['sources']) == sorted(t.name for t in EVERY)
    for task in EVERY:
        for split in ('val', 'test'):
            folder = osp.join(out, task.name, split)
            names = sorted(read_lmdb_meta(osp.join(folder, 'lq.lmdb')))
            assert len(names) >= HELD_OUT_IMAGES[split] and names == sorted(read_lmdb_meta(osp.join(folder, 'gt.lmdb')))
            assert sorted(os.listdir(osp.join(folder, 'gt'))) == [n + '.png' for n in names]
    for pool, record in manifest['pools'].items():
        assert 2 <= len(record['train']) <= DEFAULT_LIMIT, pool
        assert sorted(read_lmdb_meta(osp.join(out, 'train', pool, 'gt.lmdb'))) == sorted(
            b['name'] for b in record['train'])
    for name, record in manifest['unseen'].items():
        assert record['images'] == HELD_OUT_IMAGES['test'], name
        assert len(read_lmdb_meta(osp.join(out, 'unseen', name, 'lq.lmdb'))) == record['images']


def test_no_held_out_block_shares_an_image_or_pixels_with_training(built):
    _, manifest = built
    for pool, record in manifest['pools'].items():
        train = record['train']
        for held in ('val', 'test'):
            for block in record[held]:
                for other in train:
                    assert block['parent'] != other['parent'], pool
                    assert not (block['original'] == other['original'] and _overlap(block['box'], other['box']))
        assert not {b['parent'] for b in record['val']} & {b['parent'] for b in record['test']}
    used = [b for record in manifest['pools'].values() for split in record.values() for b in split]
    unseen = [b for record in manifest['unseen'].values() for b in record['blocks']]
    assert unseen and {b['original'] for b in unseen} - {b['original'] for b in used}  # other images...
    for block in unseen:  # ... or pixels of a mosaic that no pool uses
        assert not any(b['original'] == block['original'] and _overlap(b['box'], block['box']) for b in used)


def test_medical_is_16bit_gray_and_others_8bit_colour(built):
    out, _ = built
    for task in EVERY:
        folder = osp.join(out, task.name, 'test', 'gt')
        img = cv2.imread(osp.join(folder, sorted(os.listdir(folder))[0]), cv2.IMREAD_UNCHANGED)
        if task.domain == 'medical':
            assert img.dtype == np.uint16 and img.ndim == 2 and img.max() > 255, task.name
        else:
            assert img.dtype == np.uint8 and img.shape[2] == 3, task.name


def test_lq_differs_from_gt_as_its_task_says_and_clean_sets_are_identical(built):
    """Over each val set (a single crop of flat sky or ice has little to lose to blur or x4 SR)."""
    out, _ = built
    for task in EVERY:
        folder = osp.join(out, task.name, 'val')
        names = sorted(os.listdir(osp.join(folder, 'gt')))
        pairs = [[cv2.imread(osp.join(folder, s, n), cv2.IMREAD_UNCHANGED).astype(np.float64) for s in ('gt', 'lq')]
                 for n in names]
        peak = 65535.0 if task.bit_depth == 16 else 255.0
        error = np.mean([np.abs(gt - lq).mean() for gt, lq in pairs]) / peak
        if task.degradation == 'identity':
            assert error == 0, task.name
            continue
        assert 0.002 < error < 0.5, (task.name, error)
        if task.task in ('sr4', 'deblur', 'mri_sr4'):  # these remove high frequencies
            gt_energy, lq_energy = (sum(_high_frequency_energy(p[i]) for p in pairs) for i in (0, 1))
            assert lq_energy < 0.5 * gt_energy, task.name


def test_descriptions_are_template_labelled_and_cover_every_image(built):
    out, manifest = built
    for task in EVERY:
        data = json.load(open(osp.join(out, task.name, 'descriptions.json')))
        assert data['__generator__'].startswith('template')
        names = {b['name'] + '.png' for split in manifest['pools'][task.pool].values() for b in split}
        assert names <= set(data) and all(data[n].startswith('[template] ') for n in names)


def test_option_fragments_build_through_basicsr(built):
    out, _ = built
    train_opt, test_opt, unseen_opt = (yaml.safe_load(open(osp.join(out, f'options_{k}.yml')))['datasets']
                                       for k in ('train', 'test', 'unseen'))
    assert sorted(test_opt) == sorted(f'test_{t.name}' for t in mdmini.TASKS)
    assert 'test_unseen_natural_clean' in unseen_opt and 'test_unseen_medical_ct_denoise' not in unseen_opt
    shares = len(mdmini.TASKS) + len(mdmini.CLEAN_TASKS) * CLEAN_WEIGHT  # twice the weight total: every source
    opt = dict(train_opt['train'], phase='train', batch_size_per_gpu=int(2 * shares), num_worker_per_gpu=0,
               sampling_seed=0)
    ds = build_dataset(opt)
    batch = next(iter(build_dataloader(ds, opt, num_gpu=0, sampler=EnlargedSampler(ds, 1, 0, 1), seed=0)))
    assert set(batch['source'].tolist()) >= set(range(9))  # every degraded source in each batch
    assert batch['lq'].shape == (opt['batch_size_per_gpu'], 3, opt['gt_size'], opt['gt_size'])
    assert torch.isfinite(batch['lq']).all()
    clean = [i for i, name in enumerate(batch['source_name']) if name.endswith('_clean')]
    degraded = [i for i, name in enumerate(batch['source_name']) if not name.endswith('_clean')]
    assert all(torch.equal(batch['lq'][i], batch['gt'][i]) for i in clean)
    changed = [not torch.equal(batch['lq'][i], batch['gt'][i]) for i in degraded]
    assert sum(changed) >= len(degraded) - 2  # a small crop may miss every cloud or streak
    val = build_dataset(dict(train_opt['val_medical_ct_denoise'], phase='val'))
    item = val[0]
    assert (item['domain_name'], item['task_name'], item['bit_depth'], item['channels']) == \
        ('medical', 'ct_denoise', 16, 1)
    test = build_dataset(dict(unseen_opt['test_unseen_rs_dehaze'], phase='test'))
    assert len(test) == HELD_OUT_IMAGES['test'] and torch.is_tensor(test[0]['gt'])


def test_reused_refused_and_never_deletes_what_it_did_not_write(built, tmp_path):
    out, manifest = built
    stamp = os.path.getmtime(osp.join(out, 'manifest.json'))
    assert mdmini.build(out, seed=0) == manifest and os.path.getmtime(osp.join(out, 'manifest.json')) == stamp
    with pytest.raises(mdmini.MiniBuildError, match='pass --overwrite'):
        mdmini.build(out, seed=5, sources=['natural_derain'])
    user = tmp_path / 'photos'
    user.mkdir()
    (user / 'holiday.jpg').write_bytes(b'mine')
    for overwrite in (False, True):
        with pytest.raises(mdmini.MiniBuildError, match='not an MD-Mini build') as err:
            mdmini.build(str(user), overwrite=overwrite, sources=['natural_derain'])
        assert 'overwrite' not in str(err.value)
    assert (user / 'holiday.jpg').read_bytes() == b'mine'


def test_overwrite_replaces_only_its_own_build_and_stale_partials_are_removed(tmp_path):
    out = str(tmp_path / 'md')
    first = mdmini.build(out, seed=0, sources=['natural_derain'], unseen=False)
    (tmp_path / 'md' / 'notes.txt').write_text('mine')
    with pytest.raises(mdmini.MiniBuildError, match='notes.txt') as err:
        mdmini.build(out, seed=1, sources=['natural_derain'], unseen=False, overwrite=True)
    assert 'overwrite' not in str(err.value).split('did not write')[1]
    assert json.load(open(osp.join(out, 'manifest.json'))) == first
    os.remove(osp.join(out, 'notes.txt'))
    second = mdmini.build(out, seed=1, sources=['natural_derain'], unseen=False, overwrite=True)
    assert second['settings']['seed'] == 1 and not [e for e in os.listdir(tmp_path) if '.old-' in e]
    dead = tmp_path / 'md.partial-999999999'
    dead.mkdir()
    assert remove_stale_builds(out) == [str(dead)] and not dead.exists()


#: A small build the overwrite tests copy (one source, two training blocks, its unseen check).
SMALL = dict(seed=0, limit=2, sources=['natural_derain'])


@pytest.fixture(scope='module')
def small_build(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('small') / 'md')
    mdmini.build(out, **SMALL)
    return out


def _tree(root):
    """Every file under ``root`` with its bytes (what an overwrite that is refused must leave as it was)."""
    return {osp.relpath(osp.join(d, f), root): open(osp.join(d, f), 'rb').read()
            for d, _, files in os.walk(root) for f in files}


def _overwrite(out, capsys):
    """``python -m datprl_arch.mdmini --out OUT --overwrite --seed 3`` in-process: exit status and stderr."""
    with pytest.raises(SystemExit) as exit_:
        mdmini_main(['--out', out, '--overwrite', '--seed', '3', '--limit', '2', '--sources', 'natural_derain'])
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize('user_files', [
    {'natural_derain/mine/notes.txt': b'x'},                 # a nested folder of a set
    {'natural_derain/val/gt/user_extra.png': b'z'},          # a file beside the build's images
    {'train/my_labels.csv': b'a,b'},                         # a file under train/
    {'unseen/natural_derain/lq.lmdb/my.idx': b'i'},          # a file inside an LMDB folder
    {'my_notes.txt': b'n', 'natural_derain/test/lq/mine/a.png': b'p'},  # top level and nested together
], ids=['set_folder', 'val_gt', 'train', 'lmdb', 'top_and_nested'])
def test_overwrite_refuses_user_files_anywhere_in_the_build_and_changes_nothing(
        small_build, tmp_path, capsys, user_files):
    """N37/N38: the whole tree is compared with the manifest's file list; the refusal names every extra path."""
    out = str(tmp_path / 'md')
    shutil.copytree(small_build, out)
    for path, data in user_files.items():
        os.makedirs(osp.dirname(osp.join(out, path)), exist_ok=True)
        with open(osp.join(out, path), 'wb') as f:
            f.write(data)
    before = _tree(out)
    code, err = _overwrite(out, capsys)
    assert code == 2 and 'Traceback' not in err and 'did not write' in err, err
    for path in user_files:
        folder = path.split('/mine/')[0] + '/mine/' if '/mine/' in path else path
        assert folder in err, (folder, err)
    assert _tree(out) == before


def test_overwrite_of_a_build_without_a_file_list_infers_its_files(small_build, tmp_path, capsys):
    """A manifest written before builds listed their files: its records say which files it wrote, so a clean
    build is replaced and one holding a user file beside its images is refused."""
    out = str(tmp_path / 'md')
    shutil.copytree(small_build, out)
    manifest = json.load(open(osp.join(out, 'manifest.json')))
    del manifest['files']
    with open(osp.join(out, 'manifest.json'), 'w') as f:
        json.dump(manifest, f)
    (tmp_path / 'md' / 'natural_derain' / 'val' / 'gt' / 'user_extra.png').write_bytes(b'z')
    code, err = _overwrite(out, capsys)
    assert code == 2 and 'natural_derain/val/gt/user_extra.png' in err and 'inferred' in err and 'Traceback' not in err
    os.remove(osp.join(out, 'natural_derain', 'val', 'gt', 'user_extra.png'))
    assert mdmini_main(['--out', out, '--overwrite', '--seed', '3', '--limit', '2', '--sources', 'natural_derain']) == 0
    assert json.load(open(osp.join(out, 'manifest.json')))['settings']['seed'] == 3


def test_a_clean_build_with_its_derived_embeddings_is_overwritten(small_build, tmp_path):
    """Every file the manifest lists, and texts.pt that tools derive, is replaced without a word."""
    out = str(tmp_path / 'md')
    shutil.copytree(small_build, out)
    (tmp_path / 'md' / 'texts.pt').write_bytes(b'derived')
    manifest = mdmini.build(out, **dict(SMALL, seed=3), overwrite=True)
    assert sorted(manifest['files']) == sorted(_tree(out)) and 'manifest.json' in manifest['files']


@pytest.mark.parametrize('args, words', [
    (['--limit', '0'], 'argument --limit: limit 0 is not a number of training blocks per pool: expected an integer '
                       '>= 1'),
    (['--limit', '-1'], 'argument --limit: limit -1 is not a number of training blocks per pool: expected an '
                        'integer >= 1'),
    (['--seed', '-5'], 'argument --seed: seed -5 is not usable: expected an integer >= 0'),
], ids=['N39_limit_0', 'N40_limit_negative', 'N42_seed_negative'])
def test_limit_and_seed_are_checked_before_anything_is_built(tmp_path, capsys, args, words):
    out = str(tmp_path / 'md')
    with pytest.raises(SystemExit) as exit_:
        mdmini_main(['--out', out, *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and words in err and 'Traceback' not in err, err
    assert not os.listdir(tmp_path)
    with pytest.raises(mdmini.MiniBuildError, match='expected an integer >= 1'):
        mdmini.build(out, limit=-1)


def test_deterministic_for_a_seed(built, tmp_path):
    out, _ = built
    again = str(tmp_path / 'again')
    mdmini.build(again, seed=0, sources=['natural_derain'], unseen=False)
    name = sorted(os.listdir(osp.join(again, 'natural_derain', 'test', 'lq')))[0]
    assert open(osp.join(out, 'natural_derain', 'test', 'lq', name), 'rb').read() == \
        open(osp.join(again, 'natural_derain', 'test', 'lq', name), 'rb').read()


def test_default_build_stays_under_100_mb(built):
    out, _ = built
    assert sum(osp.getsize(osp.join(d, f)) for d, _, files in os.walk(out) for f in files) < 100e6


def test_split_spreads_held_out_sets_over_units_and_trains_on_flat_blocks():
    """Test spans >= 3 units and val >= 2; a unit with nothing textured to score on trains instead of vanishing,
    and training keeps flat blocks (sky, ice) that the held-out sets skip."""
    rng = np.random.default_rng(0)
    side = mdmini_split.train_side('natural')
    textured = [mdmini_split.Parent(f't{i}', rng.random((side * 2, side * 2, 3)).astype(np.float32), f't{i}')
                for i in range(5)]  # exactly what test (3 units) and val (2) need
    flat = mdmini_split.Parent('flat', np.full((side * 2, side * 2, 3), 0.7, np.float32), 'flat')
    out = mdmini_split.split_pool(textured + [flat], 'natural', np.random.default_rng(1))
    units = {s: {b.parent.name for b in out[s]} for s in mdmini_split.SPLITS}
    assert len(out['test']) == mdmini_split.HELD_OUT_IMAGES['test'] and len(units['test']) >= 3
    assert len(out['val']) == mdmini_split.HELD_OUT_IMAGES['val'] and len(units['val']) >= 2
    assert 'flat' in units['train'] and not units['train'] & (units['test'] | units['val'])
    assert sum(b.parent.name == 'flat' for b in out['train']) == 4  # all four 192-px blocks of the flat unit
