"""make_lmdb: BasicSR-readable output, 16-bit kept, key checks, atomic install, and LMDB sharing inside a process."""
import os
import subprocess
import sys

import cv2
import lmdb
import numpy as np
import pytest
import torch

import datprl_arch  # noqa: F401
from basicsr.data import build_dataset
from basicsr.utils.file_client import FileClient, LmdbBackend
from datprl_arch.data.lmdb import writer
from datprl_arch.data.lmdb.meta import read_lmdb_meta
from datprl_arch.data.lmdb.writer import LmdbWriteError, folder_items, make_paired_lmdb, verify_lmdb, write_lmdb
from datprl_arch.tools import make_lmdb

from toy import write_pairs

#: lmdb>=2 refuses a second open of one environment per process; datprl_arch._compat installs a shared backend.
needs_shared_lmdb = pytest.mark.skipif(FileClient._backends['lmdb'] is LmdbBackend and int(lmdb.__version__[0]) >= 2,
                                       reason="needs the shared LMDB backend of datprl_arch._compat (lmdb>=2)")


def multi(sources, phase='val', name='t'):
    return build_dataset(dict(name=name, type='DATPRLMultiDomainDataset', phase=phase, datasets=sources))


def lmdb_source(name, gt_db, lq_db):
    return dict(name=name, domain='natural', task=name, dataroot_gt=gt_db, dataroot_lq=lq_db,
                io_backend={'type': 'lmdb'})


@pytest.fixture
def dbs(tmp_path):
    dirs = write_pairs(str(tmp_path / 'rgb'), 3, (24, 32))
    gt_db, lq_db = str(tmp_path / 'gt.lmdb'), str(tmp_path / 'lq.lmdb')
    assert make_paired_lmdb(*dirs, gt_db, lq_db) == 3
    return dirs, gt_db, lq_db


def test_meta_info_and_values_follow_basicsr_format(dbs):
    dirs, gt_db, _ = dbs
    lines = open(os.path.join(gt_db, 'meta_info.txt')).read().splitlines()
    assert lines == [f'img00{i}.png (24,32,3) 1' for i in range(3)]
    env = lmdb.open(gt_db, readonly=True, lock=False)
    with env.begin() as txn:
        img = cv2.imdecode(np.frombuffer(txn.get(b'img001'), np.uint8), cv2.IMREAD_UNCHANGED)
    env.close()
    assert np.array_equal(img, cv2.imread(f'{dirs[0]}/img001.png', cv2.IMREAD_UNCHANGED))
    assert verify_lmdb(gt_db) == 3


@needs_shared_lmdb
def test_basicsr_paired_dataset_and_ours_read_the_same_pixels(dbs):
    dirs, gt_db, lq_db = dbs
    stock = build_dataset(dict(name='stock', type='PairedImageDataset', phase='val', scale=1, dataroot_gt=gt_db,
                               dataroot_lq=lq_db, io_backend={'type': 'lmdb'}))
    ours = multi([lmdb_source('rgb', gt_db, lq_db)])
    disk = multi([dict(lmdb_source('rgb', *dirs), io_backend={'type': 'disk'})])
    assert len(stock) == len(ours) == 3
    for i in range(3):
        a, b, c = stock[i], ours[i], disk[i]
        assert a['lq_path'] == b['lq_path'] == f'img00{i}'
        assert torch.equal(a['gt'], b['gt']) and torch.equal(a['lq'], b['lq'])
        assert torch.equal(b['gt'], c['gt']) and torch.equal(b['lq'], c['lq'])


def test_16bit_single_channel_is_preserved(tmp_path):
    dirs = write_pairs(str(tmp_path / 'ct'), 2, (20, 28), bit_depth=16, channels=1)
    gt_db, lq_db = str(tmp_path / 'ct_gt.lmdb'), str(tmp_path / 'ct_lq.lmdb')
    make_paired_lmdb(*dirs, gt_db, lq_db)
    assert read_lmdb_meta(gt_db) == {'img000': (20, 28, 1), 'img001': (20, 28, 1)}
    item = multi([lmdb_source('ct', gt_db, lq_db)], name='ct')[1]
    raw = cv2.imread(f'{dirs[0]}/img001.png', cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and (item['bit_depth'], item['channels']) == (16, 1)
    assert torch.equal(item['gt'][0], torch.from_numpy(raw.astype(np.float32) / 65535.0))


def test_keys_with_dots_or_spaces_are_rejected_before_writing(tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    img = np.zeros((8, 8, 3), np.uint8)
    for name in ('0001_0.8_0.2.png', 'a b.png', 'ok.png'):
        cv2.imwrite(str(folder / name), img)
    out = str(tmp_path / 'x.lmdb')
    with pytest.raises(LmdbWriteError) as err:
        write_lmdb(folder_items(str(folder)), out)
    msg = str(err.value)
    assert msg.startswith(f'LMDB {out}: 2 problem(s) (nothing was written):') and 'Dataset' not in msg
    assert "key '0001_0.8_0.2' contains '.'" in msg and "'0001_0_8_0_2'" in msg
    assert "key 'a b' must be printable ASCII without whitespace" in msg
    assert os.listdir(tmp_path) == ['imgs']


def test_existing_target_needs_overwrite(dbs, tmp_path):
    dirs, gt_db, _ = dbs
    with pytest.raises(LmdbWriteError, match='already exists; pass --overwrite'):
        write_lmdb(folder_items(dirs[0]), gt_db)
    assert write_lmdb(folder_items(dirs[1]), gt_db, overwrite=True) == 3
    assert verify_lmdb(gt_db) == 3
    assert sorted(os.listdir(tmp_path)) == ['gt.lmdb', 'lq.lmdb', 'rgb']


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    dirs = write_pairs(str(tmp_path / 'src'), 4, (16, 16))
    real, calls = cv2.imencode, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer.cv2, 'imencode', failing)
    with pytest.raises(KeyboardInterrupt):
        write_lmdb(folder_items(dirs[0]), str(tmp_path / 'gt.lmdb'))
    assert sorted(os.listdir(tmp_path)) == ['src']


def test_stale_partial_of_a_killed_run_is_never_read_and_is_cleaned(tmp_path):
    dirs = write_pairs(str(tmp_path / 'src'), 2, (16, 16))
    stale = tmp_path / 'gt.lmdb.partial-99999'
    stale.mkdir()
    (stale / 'data.mdb').write_bytes(b'\0' * 64)
    assert write_lmdb(folder_items(dirs[0]), str(tmp_path / 'gt.lmdb')) == 2
    assert sorted(os.listdir(tmp_path)) == ['gt.lmdb', 'src']


def test_map_full_is_reported_and_cleaned(tmp_path):
    dirs = write_pairs(str(tmp_path / 'src'), 3, (64, 64))
    with pytest.raises(LmdbWriteError, match='map size 32768 bytes is too small; pass a larger --map-size'):
        write_lmdb(folder_items(dirs[0]), str(tmp_path / 'gt.lmdb'), map_size=32768)
    assert sorted(os.listdir(tmp_path)) == ['src']


def test_unpaired_folders_are_refused(tmp_path):
    gt, lq = write_pairs(str(tmp_path / 'src'), 2, (16, 16))
    os.remove(os.path.join(lq, 'img001.png'))
    with pytest.raises(LmdbWriteError, match='img001.png has no LQ partner'):
        make_paired_lmdb(gt, lq, str(tmp_path / 'g.lmdb'), str(tmp_path / 'l.lmdb'))
    assert sorted(os.listdir(tmp_path)) == ['src']


@pytest.mark.slow
def test_command_line(tmp_path, capsys):
    gt, lq = write_pairs(str(tmp_path / 'src'), 2, (16, 16), lq_tmpl='{}_x1')
    cmd = [sys.executable, '-m', 'datprl_arch.tools.make_lmdb', '--gt', gt, '--lq', lq, '--gt-lmdb',
           str(tmp_path / 'g.lmdb'), '--lq-lmdb', str(tmp_path / 'l.lmdb'), '--filename-tmpl', '{}_x1']
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert 'Wrote 2 images to' in done.stderr
    assert read_lmdb_meta(str(tmp_path / 'l.lmdb')) == {'img000': (16, 16, 3), 'img001': (16, 16, 3)}
    with pytest.raises(SystemExit) as again:
        make_lmdb.main(cmd[3:])
    assert again.value.code == 2
    assert 'already exists; pass --overwrite' in capsys.readouterr().err


@needs_shared_lmdb
def test_test_sets_sharing_one_gt_lmdb_and_validation_on_the_training_lmdb(tmp_path, dbs):
    """lmdb>=2 refuses a second open of one environment per process; the shared backend of _compat fixes it."""
    dirs, gt_db, lq_db = dbs
    lq2 = str(tmp_path / 'lq2.lmdb')
    write_lmdb([(f'img00{i}', f'{dirs[1]}/img00{i}.png') for i in range(3)], lq2)
    train = build_dataset(dict(name='train', type='DATPRLMultiDomainDataset', phase='train', gt_size=16,
                               sampling_seed=0, datasets=[lmdb_source('a', gt_db, lq_db)]))
    train[0]
    sets = [multi([lmdb_source('a', gt_db, lq_db)], name='val_on_train'),
            multi([lmdb_source('b', gt_db, lq2)], name='test_b')]
    stock = build_dataset(dict(name='stock', type='PairedImageDataset', phase='val', scale=1, dataroot_gt=gt_db,
                               dataroot_lq=lq2, io_backend={'type': 'lmdb'}))
    for ds in (*sets, stock):
        assert torch.equal(ds[2]['gt'], sets[0][2]['gt'])


def test_a_paired_write_that_cannot_finish_writes_neither_database(tmp_path):
    from datprl_arch.data.lmdb.writer import LmdbWriteError, make_paired_lmdb
    gt, lq = write_pairs(str(tmp_path / 'pairs'), count=2, size=(16, 16))
    (tmp_path / 'lq.lmdb').mkdir()  # the LQ target exists already
    with pytest.raises(LmdbWriteError, match='lq.lmdb already exists'):
        make_paired_lmdb(gt, lq, str(tmp_path / 'gt.lmdb'), str(tmp_path / 'lq.lmdb'))
    assert sorted(os.listdir(tmp_path)) == ['lq.lmdb', 'pairs']
    with open(os.path.join(lq, 'img001.png'), 'wb') as f:  # the last LQ image is unreadable
        f.write(b'not a png')
    os.rmdir(tmp_path / 'lq.lmdb')
    with pytest.raises(ValueError, match='img001.png: not a readable image'):
        make_paired_lmdb(gt, lq, str(tmp_path / 'gt.lmdb'), str(tmp_path / 'lq.lmdb'))
    assert sorted(os.listdir(tmp_path)) == ['pairs']
