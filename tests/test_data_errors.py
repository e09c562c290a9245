"""Bad input fails at dataset construction with a message naming the source, the file and what was expected."""
import os
import re
import shutil

import pytest

import datprl_arch  # noqa: F401
from basicsr.data import build_dataset
from datprl_arch.data.lmdb.writer import make_paired_lmdb
from datprl_arch.data.sources import DataSourceError
from datprl_arch.utils.problems import MAX_LISTED

from toy import write_pairs


def build(tmp_path, phase='val', gt_size=None, **src_extra):
    gt, lq = src_extra.pop('dirs', None) or (str(tmp_path / 'gt'), str(tmp_path / 'lq'))
    src = dict(name='rain', domain='natural', task='derain', dataroot_gt=gt, dataroot_lq=lq,
               io_backend={'type': 'disk'})
    src.update(src_extra)
    opt = dict(name='train_set', type='DATPRLMultiDomainDataset', phase=phase, datasets=[src])
    if gt_size:
        opt['gt_size'] = gt_size
    return build_dataset(opt)


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(str(tmp_path), 3, (32, 40))


def test_lq_without_gt_and_gt_without_lq(tmp_path, pairs):
    gt, lq = pairs
    os.remove(os.path.join(gt, 'img001.png'))
    os.remove(os.path.join(lq, 'img002.png'))
    with pytest.raises(DataSourceError) as err:
        build(tmp_path)
    msg = str(err.value)
    assert "Dataset 'train_set': 2 problem(s)" in msg
    assert f'[rain] GT {gt}/img002.png has no LQ partner: expected {lq}/img002.' in msg
    assert f'[rain] LQ {lq}/img001.png has no GT partner in {gt}' in msg


def test_unreadable_image(tmp_path, pairs):
    with open(os.path.join(pairs[1], 'img000.png'), 'wb') as f:
        f.write(b'this is not an image')
    with pytest.raises(DataSourceError, match=re.escape(f'[rain] {pairs[1]}/img000.png: not a readable image')):
        build(tmp_path)


def test_truncated_png(tmp_path, pairs):
    path = os.path.join(pairs[0], 'img002.png')
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(DataSourceError, match=re.escape(f'{path}: truncated or damaged PNG')):
        build(tmp_path)


@pytest.mark.parametrize('phase', ['train', 'val'])
def test_zero_byte_image_is_named_at_construction(tmp_path, pairs, phase):
    """N69: an empty GT file (its LQ partner valid) is named as empty, not reported by an OpenCV assertion."""
    path = os.path.join(pairs[0], 'img001.png')
    open(path, 'wb').close()
    with pytest.raises(DataSourceError) as err:
        build(tmp_path, phase=phase, gt_size=16 if phase == 'train' else None)
    assert f'[rain] {path}: empty file (0 bytes); expected an image (PNG, TIFF, JPEG or BMP).' in str(err.value)
    assert 'cv2' not in str(err.value) and err.value.__cause__ is None


def test_sizes_that_contradict_the_declared_scale(tmp_path):
    dirs = write_pairs(str(tmp_path), 2, (32, 48), scale=4)
    with pytest.raises(DataSourceError) as err:
        build(tmp_path, dirs=dirs)
    msg = str(err.value)
    pair = f'LQ {dirs[1]}/img000.png 8x12 vs GT {dirs[0]}/img000.png 32x48'
    assert f'{pair}: sizes do not match the declared scale 1' in msg
    assert 'declare scale: 4 and upsample_lq: true' in msg
    with pytest.raises(DataSourceError, match='do not match the declared scale 2'):
        build(tmp_path, dirs=dirs, scale=2, upsample_lq=True)
    assert len(build(tmp_path, dirs=dirs, scale=4, upsample_lq=True)) == 2


def test_empty_and_missing_folders(tmp_path, pairs):
    for name in os.listdir(pairs[1]):
        os.remove(os.path.join(pairs[1], name))
    with pytest.raises(DataSourceError, match=re.escape(f'[rain] LQ folder {pairs[1]} is empty (expected image files')):
        build(tmp_path)
    shutil.rmtree(pairs[1])
    with pytest.raises(DataSourceError, match=re.escape(f'[rain] LQ folder {pairs[1]} does not exist')):
        build(tmp_path)


def test_crop_larger_than_an_image(tmp_path, pairs):
    with pytest.raises(DataSourceError, match=r'crop size gt_size=48 is larger than the image'):
        build(tmp_path, phase='train', gt_size=48)
    assert len(build(tmp_path, phase='train', gt_size=32)) == 3


def test_training_needs_a_crop_size(tmp_path, pairs):
    with pytest.raises(DataSourceError, match=r'\[gt_size\] training needs gt_size'):
        build(tmp_path, phase='train')


def test_unknown_key_lists_accepted_keys(tmp_path, pairs):
    with pytest.raises(DataSourceError) as err:
        build(tmp_path, wieght=2.0)
    msg = str(err.value)
    assert "[rain] unknown key 'wieght' (did you mean 'weight'?); accepted keys: name, domain, task" in msg
    assert 'descriptions' in msg


def test_bad_values(tmp_path, pairs):
    with pytest.raises(DataSourceError) as err:
        build(tmp_path, weight=-1, augment_factor=1.5, io_backend={'type': 'memcached'})
    msg = str(err.value)
    assert 'weight must be a positive float, got -1' in msg
    assert 'augment_factor must be a positive int, got 1.5' in msg
    assert "io_backend.type must be one of ('disk', 'lmdb'), got 'memcached'" in msg


def test_many_problems_are_summarised(tmp_path, pairs):
    for i in range(MAX_LISTED + 2):
        with open(os.path.join(pairs[1], f'orphan{i:02d}.png'), 'wb') as f:
            f.write(b'x')
    with pytest.raises(DataSourceError) as err:
        build(tmp_path)
    msg = str(err.value)
    assert f'{MAX_LISTED + 2} problem(s)' in msg and '... and 2 more.' in msg


def test_lmdb_without_meta_info_or_with_missing_keys(tmp_path, pairs):
    gt_db, lq_db = str(tmp_path / 'gt.lmdb'), str(tmp_path / 'lq.lmdb')
    make_paired_lmdb(*pairs, gt_db, lq_db)
    lmdb_src = dict(dirs=(gt_db, lq_db), io_backend={'type': 'lmdb'})
    assert len(build(tmp_path, **lmdb_src)) == 3
    meta = os.path.join(lq_db, 'meta_info.txt')
    lines = open(meta).read()
    with open(meta, 'a') as f:
        f.write('ghost.png (32,40,3) 1\n')
    with open(os.path.join(gt_db, 'meta_info.txt'), 'a') as f:
        f.write('ghost.png (32,40,3) 1\n')
    with pytest.raises(DataSourceError, match=re.escape(f"LQ LMDB {lq_db}: 1 key(s) in meta_info.txt are missing "
                                                        "from the database, e.g. ['ghost']")):
        build(tmp_path, **lmdb_src)
    with open(meta, 'w') as f:
        f.write(lines)
    with pytest.raises(DataSourceError, match=re.escape(f"GT key 'ghost' of {gt_db} has no LQ partner in {lq_db}")):
        build(tmp_path, **lmdb_src)
    os.remove(meta)
    with pytest.raises(DataSourceError, match=re.escape(f'[rain] LQ LMDB {lq_db} has no meta_info.txt')):
        build(tmp_path, **lmdb_src)


def test_lmdb_roots_must_be_lmdb(tmp_path, pairs):
    with pytest.raises(DataSourceError, match=re.escape(f'GT root {pairs[0]} must end with .lmdb')):
        build(tmp_path, io_backend={'type': 'lmdb'})


def test_missing_datasets_list_and_duplicate_names(tmp_path, pairs):
    with pytest.raises(DataSourceError, match='expected a non-empty list of sources'):
        build_dataset(dict(name='x', type='DATPRLMultiDomainDataset', phase='val'))
    src = dict(name='a', domain='d', task='t', dataroot_gt=pairs[0], dataroot_lq=pairs[1])
    with pytest.raises(DataSourceError, match=r'\[a\] source names must be unique'):
        build_dataset(dict(name='x', type='DATPRLMultiDomainDataset', phase='val', datasets=[src, src]))
