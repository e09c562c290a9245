"""Loader throughput (``python -m datprl_arch.throughput``): the measured options and the table, without timing."""
import yaml

from datprl_arch import throughput


def test_train_options_switch_every_source_to_the_backend(tmp_path):
    sources = [{'name': 'rain', 'dataroot_gt': 'pools/natural/gt.lmdb', 'mode': 'synth',
                'io_backend': {'type': 'lmdb'}},
               {'name': 'ct', 'dataroot_gt': 'ct/gt', 'dataroot_lq': 'ct/lq', 'io_backend': {'type': 'disk'}}]
    (tmp_path / 'options_train.yml').write_text(yaml.safe_dump(
        {'datasets': {'train': {'batch_size_per_gpu': 9, 'datasets': sources}}}))
    disk = throughput.train_options(str(tmp_path), 'disk', workers=2)
    assert [s['dataroot_gt'] for s in disk['datasets']] == ['pools/natural/gt', 'ct/gt']
    assert 'dataroot_lq' not in disk['datasets'][0] and disk['datasets'][1]['dataroot_lq'] == 'ct/lq'
    assert {s['io_backend']['type'] for s in disk['datasets']} == {'disk'}
    assert (disk['num_worker_per_gpu'], disk['gt_size'], disk['phase']) == (2, throughput.GT_SIZE, 'train')
    lmdb = throughput.train_options(str(tmp_path), 'lmdb', workers=0)
    assert [s['dataroot_gt'] for s in lmdb['datasets']] == ['pools/natural/gt.lmdb', 'ct/gt.lmdb']
    assert lmdb['datasets'][1]['dataroot_lq'] == 'ct/lq.lmdb'


def test_table_gives_the_lmdb_speed_up_per_worker_count():
    rows = [{'backend': 'disk', 'workers': 0, 'samples_per_s': 100.0},
            {'backend': 'lmdb', 'workers': 0, 'samples_per_s': 250.0},
            {'backend': 'disk', 'workers': 1, 'samples_per_s': 80.0}]
    lines = throughput.table(rows).splitlines()
    assert lines[2] == '| 0 | 100 | 250 | 2.50x |'
    assert lines[3] == '| 1 | - | - | - |'
