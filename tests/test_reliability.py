"""Reliability regressions (docs/reliability.md): no data lost or mixed, no poisoned checkpoint written or resumed,
no crash without a message, every bad option named before anything runs, no quiet wrong results.

Kills are simulated in-process (an exception raised at the chosen step, with the writer's pid pointing at a process
that has exited); the truncated-LMDB cases, which would end the process with SIGBUS if a check were missing, and the
runner's clean message run in subprocesses.
"""
import copy
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import cv2
import lmdb
import numpy as np
import pytest
import torch
import yaml

import datprl_arch  # noqa: F401
from datprl_arch import _compat
from datprl_arch import test as test_runner
from datprl_arch import train
from basicsr.data import build_dataset
from basicsr.models import build_model
from basicsr.utils import get_root_logger
from datprl_arch.archs.restormer_arch import PaddedRestormer
from datprl_arch.data.lmdb import install, writer
from datprl_arch.data.lmdb.meta import read_build_record
from datprl_arch.data.lmdb.writer import LmdbWriteError, make_paired_lmdb
from datprl_arch.data.multidomain_dataset import label_warnings
from datprl_arch.data.sources import DataSourceError
from datprl_arch.options import OptionFileError, load_option_file
from datprl_arch.options_schema import validate
from datprl_arch.utils import folders, resume
from datprl_arch.utils.checkpoint import CheckpointError, load_checkpoint
from datprl_arch.utils.network_probe import PROBE_SIZE

from networks import SMALL_PROMPTS
from toy import write_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FILE = os.path.join(ROOT, 'options', 'demo', 'md_mini_train.yml')
EDSR_FILE = os.path.join(ROOT, 'options', 'train', 'md_mini_edsr.yml')
TEST_FILE = os.path.join(ROOT, 'options', 'demo', 'md_mini_test.yml')
ENV = dict(os.environ, OMP_NUM_THREADS='1')
SUBPROCESS_TIMEOUT_S = 300
TINY_NET = dict(type='PaddedRestormer', dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])


def dead_pid() -> int:
    """The id of a process that has exited (what a killed writer leaves in its file names)."""
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


@pytest.fixture
def log_records():
    """Messages BasicSR's logger emits during the test."""
    handler = logging.Handler()
    handler.records = []
    handler.emit = handler.records.append
    logger = get_root_logger()
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def messages(records):
    return '\n'.join(r.getMessage() for r in records)


def lmdb_set(gt_db, lq_db, name='s', verify=True):
    return build_dataset(dict(name='t', type='DATPRLMultiDomainDataset', phase='val', verify_images=verify,
                              datasets=[dict(name=name, domain='d', task='t', dataroot_gt=gt_db, dataroot_lq=lq_db,
                                             io_backend={'type': 'lmdb'})]))


# ------------------------------------------------------------------------------------------------ data
def test_make_lmdb_pair_killed_during_the_swap_is_refused_then_finished(tmp_path, monkeypatch):
    old_dirs = write_pairs(str(tmp_path / 'old'), 3, (16, 16), seed=0)
    new_dirs = write_pairs(str(tmp_path / 'new'), 3, (16, 16), seed=1)
    gt_db, lq_db = str(tmp_path / 'gt.lmdb'), str(tmp_path / 'lq.lmdb')
    make_paired_lmdb(*old_dirs, gt_db, lq_db)
    old_gt_content = read_build_record(gt_db)['content']

    pid, real_replace = dead_pid(), os.replace

    def killed_after_the_gt_is_in(src, dst):  # gt -> gt.old, gt.partial -> gt, then the "kill" at lq -> lq.old
        if dst == f'{lq_db}.old-{pid}':
            raise KeyboardInterrupt('killed during the install')
        real_replace(src, dst)

    monkeypatch.setattr(os, 'getpid', lambda: pid)
    monkeypatch.setattr(os, 'replace', killed_after_the_gt_is_in)
    with pytest.raises(KeyboardInterrupt):
        make_paired_lmdb(*new_dirs, gt_db, lq_db, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ['gt.lmdb', f'gt.lmdb.old-{pid}', 'lq.lmdb', f'lq.lmdb.partial-{pid}',
                                            'new', 'old']
    assert read_build_record(gt_db)['content'] != old_gt_content  # the new GT beside the old LQ

    with pytest.raises(DataSourceError) as err:  # the mismatched pair is an error naming both databases
        lmdb_set(gt_db, lq_db)
    text = str(err.value)
    assert f'GT LMDB {gt_db} (build' in text and f'LQ LMDB {lq_db} (build' in text
    assert 'come from different make_lmdb runs' in text and f'gt.lmdb.old-{pid} is left over' in text

    with pytest.raises(LmdbWriteError, match='already exists'):  # the next run (even without --overwrite) recovers
        make_paired_lmdb(*new_dirs, gt_db, lq_db)
    assert sorted(os.listdir(tmp_path)) == ['gt.lmdb', 'lq.lmdb', 'new', 'old']
    dataset = lmdb_set(gt_db, lq_db)
    for i, name in enumerate(sorted(os.listdir(new_dirs[1]))):
        lq = cv2.imread(os.path.join(new_dirs[1], name))[..., ::-1].transpose(2, 0, 1) / 255.0
        assert np.allclose(dataset[i]['lq'].numpy(), lq, atol=1e-6)  # new GT with new LQ


def test_make_lmdb_killed_after_both_renames_reads_the_new_pair(tmp_path, monkeypatch):
    gt_db, lq_db = str(tmp_path / 'gt.lmdb'), str(tmp_path / 'lq.lmdb')
    make_paired_lmdb(*write_pairs(str(tmp_path / 'old'), 2, (16, 16), seed=0), gt_db, lq_db)
    pid = dead_pid()
    monkeypatch.setattr(os, 'getpid', lambda: pid)
    monkeypatch.setattr(install, 'remove', lambda path: None)  # killed before the old copies are removed
    make_paired_lmdb(*write_pairs(str(tmp_path / 'new'), 2, (16, 16), seed=1), gt_db, lq_db, overwrite=True)
    monkeypatch.undo()
    assert f'gt.lmdb.old-{pid}' in os.listdir(tmp_path) and f'lq.lmdb.old-{pid}' in os.listdir(tmp_path)
    assert len(lmdb_set(gt_db, lq_db)) == 2  # the build records confirm the new pair
    assert install.recover_interrupted_installs([gt_db]) == [
        f'An install of {gt_db} + {lq_db} interrupted in process {pid} was already complete (the new databases were '
        'in place; the old copies are removed).']
    assert sorted(os.listdir(tmp_path)) == ['gt.lmdb', 'lq.lmdb', 'new', 'old']


def test_make_lmdb_killed_before_both_are_built_keeps_the_old_pair(tmp_path, monkeypatch):
    old_dirs = write_pairs(str(tmp_path / 'old'), 2, (16, 16), seed=0)
    gt_db, lq_db = str(tmp_path / 'gt.lmdb'), str(tmp_path / 'lq.lmdb')
    make_paired_lmdb(*old_dirs, gt_db, lq_db)
    records = read_build_record(gt_db), read_build_record(lq_db)
    assert records[1]['partner_content'] == records[0]['content'] and records[0]['partner'] == 'lq.lmdb'
    pid, real_read_back = dead_pid(), writer._read_back
    (tmp_path / 'gt.lmdb.partial-1').mkdir()  # a live process's build (pid 1 always runs): never touched

    def killed_in_the_lq_build(tmp, digests):
        if 'lq.lmdb' in tmp:
            raise KeyboardInterrupt
        return real_read_back(tmp, digests)

    monkeypatch.setattr(os, 'getpid', lambda: pid)
    monkeypatch.setattr(writer, '_read_back', killed_in_the_lq_build)
    monkeypatch.setattr(shutil, 'rmtree', lambda *a, **k: None)  # a kill cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        make_paired_lmdb(*write_pairs(str(tmp_path / 'new'), 2, (16, 16), seed=1), gt_db, lq_db, overwrite=True)
    monkeypatch.undo()
    assert f'gt.lmdb.partial-{pid}' in os.listdir(tmp_path)
    assert install.recover_interrupted_installs([gt_db, lq_db]) == [
        f'An install of {gt_db} + {lq_db} interrupted in process {pid} was undone (the previous databases are kept).']
    assert sorted(os.listdir(tmp_path)) == ['gt.lmdb', 'gt.lmdb.partial-1', 'lq.lmdb', 'new', 'old']
    assert (read_build_record(gt_db), read_build_record(lq_db)) == records
    assert len(lmdb_set(gt_db, lq_db)) == 2


def test_stale_leftovers_of_dead_writers_are_removed_live_ones_kept_none_read(tmp_path):
    exp = tmp_path / 'experiments' / 'run'
    (exp / 'models').mkdir(parents=True)
    (exp / 'training_states').mkdir()
    torch.save({'epoch': 0, 'iter': 2}, exp / 'training_states' / '2.state')
    torch.save({'params': {}}, exp / 'models' / 'net_g_2.pth')
    pid = dead_pid()
    stale = [exp / 'models' / f'net_g_4.pth.tmp-{pid}', exp / 'training_states' / f'4.state.tmp-{pid}',
             exp / f'metrics.json.tmp-{pid}']
    live = exp / 'training_states' / f'6.state.tmp-{os.getpid()}'
    for path in stale + [live]:
        path.write_bytes(b'PK\x03\x04 half a file')
    opt = dict(auto_resume=True, name='run', network_g={},
               path=dict(experiments_root=str(exp), training_states=str(exp / 'training_states'),
                         models=str(exp / 'models'), resume_state=None), train=dict(total_iter=10))
    state = _compat.load_resume_state(opt)
    assert state['iter'] == 2 and opt['path']['resume_state'].endswith('2.state')  # never the .tmp ones
    assert not any(p.exists() for p in stale) and live.exists()
    assert any('Removed 3 leftover file(s)' in m for _, m in resume.pending(opt))


def _truncation_cases(tmp_path):
    dirs = write_pairs(str(tmp_path / 'src'), 6, (64, 64))
    cases = {}
    for case in ('half', 'tail', 'empty', 'after', 'pages'):
        gt_db, lq_db = str(tmp_path / case / 'gt.lmdb'), str(tmp_path / case / 'lq.lmdb')
        make_paired_lmdb(*dirs, gt_db, lq_db)
        cases[case] = (gt_db, lq_db)
    return cases


TRUNCATIONS = r'''
import json, os, random, sys
import datprl_arch
from basicsr.data import build_dataset
from datprl_arch.errors import DatprlError
cases, out = json.loads(sys.argv[1]), {}
def build(gt, lq):
    return build_dataset(dict(name='t', type='DATPRLMultiDomainDataset', phase='val', datasets=[dict(
        name='s', domain='d', task='t', dataroot_gt=gt, dataroot_lq=lq, io_backend={'type': 'lmdb'})]))
for case, (gt, lq) in cases.items():
    data = os.path.join(gt, 'data.mdb')
    size = os.path.getsize(data)
    try:
        if case == 'pages':  # random bytes over the page tree: garbage the reader must notice, or not crash on
            blob = bytearray(open(data, 'rb').read())
            blob[8192:size - 4096] = random.Random(0).randbytes(size - 12288)
            open(data, 'wb').write(bytes(blob))
        elif case != 'after':
            os.truncate(data, {'half': size // 2, 'tail': size - 4096, 'empty': 0}[case])
        dataset = build(gt, lq)
        dataset[0]
        if case == 'after':  # cut short while open: the next read is an error, not SIGBUS
            os.truncate(data, size // 2)
        [dataset[i] for i in range(len(dataset))]
        out[case] = 'read'
    except DatprlError as err:
        out[case] = f'{type(err).__name__}: {err}'
print(json.dumps(out))
'''


def test_truncated_or_damaged_lmdb_is_an_error_naming_it_never_sigbus(tmp_path):
    cases = _truncation_cases(tmp_path)
    done = subprocess.run([sys.executable, '-c', TRUNCATIONS, json.dumps(cases)], capture_output=True, text=True,
                          env=ENV, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]  # -7 would be SIGBUS
    result = json.loads(done.stdout.splitlines()[-1])
    for case in ('half', 'tail'):
        assert result[case].startswith('DataSourceError') and f'GT LMDB {cases[case][0]}: data.mdb is truncated' \
            in result[case], result[case]
    assert f'LMDB {cases["empty"][0]}: data.mdb is empty (0 bytes)' in result['empty']
    assert result['after'].startswith('LmdbError') and f'LMDB {cases["after"][0]}: data.mdb is truncated' \
        in result['after']
    assert cases['pages'][0] in result['pages'], result['pages']


def test_damaged_image_inside_an_lmdb_is_found_at_construction_with_db_and_key(tmp_path):
    dirs = write_pairs(str(tmp_path / 'src'), 3, (64, 64))
    gt_db, lq_db = str(tmp_path / 'gt.lmdb'), str(tmp_path / 'lq.lmdb')
    make_paired_lmdb(*dirs, gt_db, lq_db)
    env = lmdb.open(gt_db, readonly=True, lock=False)
    with env.begin() as txn:
        value = txn.get(b'img001')
    env.close()
    data = os.path.join(gt_db, 'data.mdb')
    blob = bytearray(open(data, 'rb').read())
    start = blob.find(value[40:104]) + 32  # inside the image data, past the header
    blob[start:start + 8] = bytes(8)
    open(data, 'wb').write(bytes(blob))
    with pytest.raises(DataSourceError, match=rf"GT LMDB {gt_db}, key 'img001': damaged PNG data \(CRC mismatch"):
        lmdb_set(gt_db, lq_db)
    assert len(lmdb_set(gt_db, lq_db, verify=False)) == 3  # verify_images: false reads the headers only


# ------------------------------------------------------------------------------------------------ checkpoints
def model_opt(tmp_path, **train_opt):
    exp = tmp_path / 'exp'
    return dict(
        name='m', model_type='DATPRLModel', is_train=True, dist=False, rank=0, world_size=1, num_gpu=0, scale=1,
        network_g=dict(TINY_NET), datasets={},
        path=dict(experiments_root=str(exp), models=str(exp / 'models'), training_states=str(exp / 'states'),
                  log=str(exp), visualization=str(exp / 'vis')),
        train=dict(dict(ema_decay=0.5, optim_g={'type': 'Adam', 'lr': 1e-3},
                        scheduler={'type': 'MultiStepLR', 'milestones': [100]}, total_iter=10,
                        pixel_opt={'type': 'L1Loss', 'loss_weight': 1.0}), **train_opt),
        val={'val_freq': 5, 'save_img': False}, logger={'print_freq': 1, 'save_checkpoint_freq': 2})


def test_poisoned_checkpoints_are_never_written(tmp_path, log_records):
    model = build_model(model_opt(tmp_path))
    lq = torch.rand(2, 3, 16, 16)
    lq[0, 0, 0, 0] = float('nan')
    model.feed_data({'lq': lq, 'gt': torch.rand(2, 3, 16, 16)})
    model.optimize_parameters(1)
    model.save(0, 2)  # the last step was non-finite
    model.nonfinite_steps = 0
    with torch.no_grad():
        model.net_g_ema.patch_embed.proj.weight[0, 0, 0, 0] = float('inf')
    model.save(0, 4)  # the EMA holds a non-finite value
    assert not os.path.exists(tmp_path / 'exp' / 'models') and not os.path.exists(tmp_path / 'exp' / 'states')
    text = messages(log_records)
    assert 'Not saving the checkpoint and training state of iter 2: the last 1 training step(s) had non-finite ' \
           'losses. The last saved checkpoint stays the newest.' in text
    assert "Not saving the checkpoint and training state of iter 4: net_g_ema holds non-finite values in 1 " \
           "tensor(s), e.g. ['patch_embed.proj.weight']" in text
    with torch.no_grad():
        model.net_g_ema.patch_embed.proj.weight[0, 0, 0, 0] = 0.0
    model.save(0, 6)
    assert sorted(os.listdir(tmp_path / 'exp' / 'models')) == ['net_g_6.pth']


def _blow_up(net):
    """Finite weights whose output is not: the last convolution at 3e38 overflows to inf on any input."""
    with torch.no_grad():
        net.output.weight.fill_(3e38)


def test_a_checkpoint_whose_network_restores_nothing_is_not_written(tmp_path, log_records):
    torch.manual_seed(0)
    model = build_model(model_opt(tmp_path))
    good = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    _blow_up(model.net_g)
    model.save(0, 1)  # every weight finite, the output on the probe is not
    model.net_g.load_state_dict(good)
    _blow_up(model.net_g_ema)
    model.save(0, 2)
    assert not os.path.exists(tmp_path / 'exp' / 'models') and not os.path.exists(tmp_path / 'exp' / 'states')
    text = messages(log_records)
    probe = rf'its output on the \[1, 3, {PROBE_SIZE}, {PROBE_SIZE}\] probe input has \d+ non-finite value\(s\) of ' \
            rf'{3 * PROBE_SIZE ** 2}'
    assert re.search(rf'Not saving the checkpoint and training state of iter 1: net_g restores nothing: {probe}\. '
                     'The last saved checkpoint stays the newest.', text)
    assert re.search(rf'Not saving the checkpoint and training state of iter 2: net_g_ema restores nothing: {probe}\.',
                     text)
    assert model.net_g.training and not model.net_g_ema.training  # the probe leaves the modes as they were
    model.net_g_ema.load_state_dict(good)
    model.save(0, 3)
    assert sorted(os.listdir(tmp_path / 'exp' / 'models')) == ['net_g_3.pth']


def _run_dirs(tmp_path):
    exp = tmp_path / 'experiments' / 'run'
    (exp / 'models').mkdir(parents=True)
    (exp / 'training_states').mkdir()
    opt = dict(auto_resume=True, name='run', network_g={}, train=dict(total_iter=10),
               path=dict(experiments_root=str(exp), training_states=str(exp / 'training_states'),
                         models=str(exp / 'models'), resume_state=None))
    return exp, opt


class NotAllowed:
    """Pickled as a global that weights_only loading refuses (as a malicious payload would be)."""


def test_auto_resume_falls_back_past_damaged_states_and_network_files(tmp_path):
    exp, opt = _run_dirs(tmp_path)
    for it in (2, 4, 6, 8, 10):
        torch.save({'epoch': 0, 'iter': it}, exp / 'training_states' / f'{it}.state')
        torch.save({'params': {'w': torch.ones(2)}}, exp / 'models' / f'net_g_{it}.pth')
    states, models = exp / 'training_states', exp / 'models'
    os.truncate(states / '10.state', os.path.getsize(states / '10.state') // 2)
    (states / '8.state').write_bytes(b'')
    torch.save({'epoch': 0, 'iter': 6, 'evil': NotAllowed()}, states / '6.state')
    os.truncate(models / 'net_g_4.pth', 100)
    state = _compat.load_resume_state(opt)
    assert state['iter'] == 2 and opt['path']['pretrain_network_g'] == str(models / 'net_g_2.pth')
    notes = '\n'.join(m for _, m in resume.pending(opt))
    assert f'skipping cannot read training state {states / "10.state"} with weights_only=True' in notes
    assert f'skipping training state {states / "8.state"} is empty (0 bytes)' in notes
    assert f'cannot read training state {states / "6.state"} with weights_only=True (it holds the Python object ' \
           'test_reliability.NotAllowed, which loading would have to run; refused, nothing was executed)' in notes
    assert f'{states / "4.state"}: its network file {models / "net_g_4.pth"} is not a complete checkpoint' in notes
    assert f'resuming from the older state {states / "2.state"} (iter 2) because 4 newer one(s)' in notes

    (states / '2.state').write_bytes(b'junk')
    with pytest.raises(CheckpointError, match=r'none of the 5 training state\(s\) in .* can be used'):
        _compat.load_resume_state(opt)
    opt.update(auto_resume=False)
    opt['path']['resume_state'] = str(states / '8.state')
    with pytest.raises(CheckpointError, match=rf'training state {states / "8.state"} is empty'):
        _compat.load_resume_state(opt)


def test_auto_resume_skips_states_whose_network_restores_nothing(tmp_path):
    exp, opt = _run_dirs(tmp_path)
    opt['network_g'] = dict(TINY_NET)
    states, models = exp / 'training_states', exp / 'models'
    torch.manual_seed(0)
    net = PaddedRestormer(**{k: v for k, v in TINY_NET.items() if k != 'type'})
    for it in (2, 4):
        if it == 4:
            _blow_up(net)  # saved after the weights blew up: finite, complete, and useless
        torch.save({'epoch': 0, 'iter': it}, states / f'{it}.state')
        torch.save({'params': net.state_dict(), 'params_ema': net.state_dict()}, models / f'net_g_{it}.pth')
    assert _compat.load_resume_state(opt)['iter'] == 2
    notes = '\n'.join(m for _, m in resume.pending(opt))
    assert f'--auto_resume: skipping {states / "4.state"}: its network file {models / "net_g_4.pth"} (params_ema) ' \
           f'restores nothing: its output on the [1, 3, {PROBE_SIZE}, {PROBE_SIZE}] probe input has ' in notes
    assert f'resuming from the older state {states / "2.state"} (iter 2) because 1 newer one(s)' in notes


def test_resume_beyond_total_iter_warns_and_keeps_the_saved_iteration(tmp_path):
    exp, opt = _run_dirs(tmp_path)
    torch.save({'epoch': 3, 'iter': 24}, exp / 'training_states' / '24.state')
    torch.save({'params': {}}, exp / 'models' / 'net_g_24.pth')
    assert _compat.load_resume_state(opt)['iter'] == 24
    assert opt['train']['total_iter'] == 24  # BasicSR's loop ends at once; final results are labelled 24, not 10
    assert ('warning', 'The resumed state is at iter 24, beyond train.total_iter 10: there is nothing left to train. '
            'The final checkpoint and validation are those of iter 24 (labelled so); raise total_iter to train '
            'further.') in resume.pending(opt)


def test_strict_load_false_warns_and_skips_mismatches(tmp_path, log_records):
    net = PaddedRestormer(**{k: v for k, v in TINY_NET.items() if k != 'type'})
    state = net.state_dict()
    state['renamed.weight'] = state.pop('output.weight')
    state['patch_embed.proj.weight'] = torch.zeros(4, 3, 3, 3)
    path = str(tmp_path / 'other.pth')
    torch.save({'params': state}, path)
    with pytest.raises(CheckpointError, match='1 missing keys'):
        load_checkpoint(PaddedRestormer(**{k: v for k, v in TINY_NET.items() if k != 'type'}), path)
    fresh = PaddedRestormer(**{k: v for k, v in TINY_NET.items() if k != 'type'})
    load_checkpoint(fresh, path, strict=False)
    assert torch.equal(fresh.refinement[0].norm1.body.weight, state['refinement.0.norm1.body.weight'])
    text = messages(log_records)
    assert f"strict_load: false: {path} does not fit PaddedRestormer exactly: 1 missing key(s) keep their initial " \
           "values ['output.weight']; 1 unexpected key(s) are ignored ['renamed.weight']; 1 tensor(s) of another " \
           "shape are skipped ['patch_embed.proj.weight: checkpoint [4, 3, 3, 3] vs network [8, 3, 3, 3]']" in text


# ------------------------------------------------------------------------------------------------ options
def _lr(o):
    o['train']['optim_g']['lr'] = '1e-3'


def _rename(section, old, new):
    def mutate(o):
        target = o if section is None else o[section]
        target[new] = target.pop(old)
    return mutate


def _no_train_set(o):
    del o['datasets']['train']


def _six(o):
    o['train']['total_iter'] = 'six'


def _inf_weight(o):
    o['datasets']['train']['datasets'][0]['weight'] = float('inf')


def _same_val_names(o):
    o['datasets']['val_copy'] = copy.deepcopy(o['datasets']['val_natural_sr4'])


def _negative_batch(o):
    o['datasets']['train']['batch_size_per_gpu'] = -2


def _no_embeddings(o):
    del o['train']['text_embeddings']


def _metric_typo(o):
    o['val']['metrics']['psnr']['type'] = 'calculate_pnsr'


def _scheduler_missing_arg(o):
    del o['train']['scheduler']['periods']


def _stages_out_of_order(o):
    o['train']['stages'] = [{'until_iter': 500}, {'until_iter': 400}, {}]


def _stage_task_typo(o):
    o['train']['stages'] = [{'until_iter': 500, 'tasks': ['derian']}, {}]


def _freeze_typo(o):
    o['train']['freeze'] = ['backbon']


def _stage_freeze_typo(o):
    o['train']['stages'] = [{'until_iter': 500, 'freeze': ['nonexistent_prefix']}, {}]


def _stage_freezes_everything(o):
    o['train']['stages'] = [{'until_iter': 500}, {'freeze': ['backbone', 'prompts']}]


def _pixel_weighting_typo(o):
    o['train']['pixel_weighting'] = 'input_err'


def _pixel_weighting_true(o):
    o['train']['pixel_weighting'] = True


def _negative_floor(o):
    o['train']['pixel_weight_floor'] = -1


def _nan_power(o):
    o['train']['pixel_weight_power'] = float('nan')


OPTION_CASES = [
    (_lr, "train.optim_g.lr: found the string '1e-3', expected a number > 0 (YAML 1.1 reads an exponent without a "
          "decimal point as a string: write `!!float 1e-3`)."),
    (_rename('train', 'total_iter', 'total_iters'),
     'train.total_iter: missing (found `total_iters`: a misspelling?); expected the number of training iterations'),
    (_rename('val', 'val_freq', 'val_frq'), 'val.val_freq: missing (found `val_frq`: a misspelling?)'),
    (_rename(None, 'network_g', 'netwrok_g'), 'network_g: missing (found `netwrok_g`: a misspelling?)'),
    (_no_train_set, 'datasets.train: missing; a training run needs a train dataset (found: val_natural_sr4, '),
    (_six, "train.total_iter: found the string 'six', expected an integer >= 1."),
    (_inf_weight, 'datasets.train.datasets: [natural_sr4] weight must be a positive float, got inf (not a finite '
                  'number).'),
    (_same_val_names, "datasets.val_copy.name: 'md_mini_val_natural_sr4' is also the name of "
                      'datasets.val_natural_sr4: validation/test sets need distinct names'),
    (_negative_batch, 'datasets.train.batch_size_per_gpu: found int -2, expected an integer >= 1.'),
    (_no_embeddings, 'train: use_clip_constraint: true, but the domain-prior constraint cannot be applied: neither '
                     'text_embeddings nor text_description_paths is set.'),
    (_metric_typo, "val.metrics.psnr.type: the string 'calculate_pnsr' is not a registered metric (did you mean "
                   '`calculate_psnr`?'),
    (_scheduler_missing_arg, 'train.scheduler.periods: missing; CosineAnnealingRestartLR (scheduler) needs it.'),
    (_stages_out_of_order, 'train.stages[1].until_iter: must be an integer >= 501 (stages run in order, each until '
                           'its until_iter), got 400'),
    (_stage_task_typo, "train.stages[0].tasks: 'derian' is not a task of datasets.train (its tasks: ['clean', "),
    (_freeze_typo, "train.freeze: 'backbon' matches no parameter of DATPRLRestormer; use 'backbone', 'prompts' or a "
                   "parameter-name prefix such as 'patch_embed'."),
    (_stage_freeze_typo, "train.stages[0].freeze: 'nonexistent_prefix' matches no parameter of DATPRLRestormer"),
    (_stage_freezes_everything, "train.stages[1].freeze: stage 2 (iters 501-2300), freezing ['backbone', 'prompts'] "
                                'leaves no trainable parameter of DATPRLRestormer (all 228 tensors frozen, nothing '
                                'would train); unfreeze a part.'),
    (_pixel_weighting_typo, "train.pixel_weighting: found the string 'input_err' (did you mean `input_error`?), "
                            'expected one of none, input_error, output_error.'),
    (_pixel_weighting_true, 'train.pixel_weighting: found bool True, expected one of none, input_error, '
                            'output_error.'),
    (_negative_floor, 'train.pixel_weight_floor: found int -1, expected a number > 0.'),
    (_nan_power, 'train.pixel_weight_power: found float nan, expected a number > 0.'),
]


@pytest.mark.parametrize('mutate, expected', OPTION_CASES, ids=[c[0].__name__ for c in OPTION_CASES])
def test_bad_options_are_named_with_file_key_found_and_expected(mutate, expected):
    opt = load_option_file(TRAIN_FILE)
    validate(opt, is_train=True, option_file='base.yml')  # the file itself is fine
    mutate(opt)
    with pytest.raises(OptionFileError) as err:
        validate(opt, is_train=True, option_file='base.yml')
    assert str(err.value).startswith('base.yml: 1 problem(s) in the option file (nothing was run):\n  - ')
    assert expected in str(err.value)


def _bad_tap(o):
    o['network_g']['taps']['task'] = 'body.99'


def _prompt_type_typo(o):
    o['network_g']['prompt']['type'] = 'DualPooll'


BACKBONE_CASES = [
    (_bad_tap, "network_g.taps.task: 'body.99' names no module that runs in the forward; usable modules: "
               'conv_first, body.0, '),
    (_prompt_type_typo, "network_g.prompt.type: found the string 'DualPooll' (did you mean `DualPool`?), expected "
                        'one of DualPool, DistributionPrompt, '),
]


@pytest.mark.parametrize('mutate, expected', BACKBONE_CASES, ids=[c[0].__name__ for c in BACKBONE_CASES])
def test_bad_backbone_options_are_named_before_anything_runs(mutate, expected):
    opt = load_option_file(EDSR_FILE)
    validate(opt, is_train=True, option_file='edsr.yml')
    mutate(opt)
    with pytest.raises(OptionFileError) as err:
        validate(opt, is_train=True, option_file='edsr.yml')
    assert str(err.value).startswith('edsr.yml: 1 problem(s) in the option file (nothing was run):\n  - ')
    assert expected in str(err.value)


def test_network_problems_end_the_runner_with_one_message_before_any_data_is_read(tmp_path):
    """The runner's output for every problem that needs the network (freeze lists, a stage freezing everything) and
    the pixel weighting, all at once; the datasets (absent here) are never reached."""
    opt = load_option_file(TRAIN_FILE)
    for mutate in (_freeze_typo, _stage_freezes_everything, _pixel_weighting_typo, _negative_floor, _nan_power):
        mutate(opt)
    path = tmp_path / 'bad.yml'
    path.write_text(yaml.safe_dump(json.loads(json.dumps(opt)), sort_keys=False))
    done = subprocess.run([sys.executable, '-m', 'datprl_arch.train', '-opt', str(path)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith(f'datprl-train: error: {path}: 5 problem(s) in the option file (nothing was run):')
    for text in ("train.freeze: 'backbon' matches no parameter", 'train.stages[1].freeze: stage 2 (iters 501-2300), '
                 "freezing ['backbone', 'prompts'] with train.freeze ['backbon'] leaves no trainable parameter",
                 "train.pixel_weighting: found the string 'input_err'", 'train.pixel_weight_floor: found int -1',
                 'train.pixel_weight_power: found float nan'):
        assert text in done.stderr
    assert os.listdir(tmp_path) == ['bad.yml']


def test_problems_are_reported_together_and_by_basicsr_pipeline_before_anything_runs(tmp_path, monkeypatch):
    text = open(TRAIN_FILE).read()
    text = text.replace('total_iter:', 'total_iters:').replace('val_freq:', 'val_frq:')
    bad = tmp_path / 'bad.yml'
    bad.write_text(text)
    monkeypatch.chdir(tmp_path)
    import basicsr.train
    monkeypatch.setattr(sys, 'argv', ['basicsr/train.py', '-opt', str(bad)])
    with pytest.raises(OptionFileError, match=r'bad\.yml: 2 problem\(s\)'):
        basicsr.train.train_pipeline(str(tmp_path))
    assert os.listdir(tmp_path) == ['bad.yml']  # no experiments folder, nothing built

    monkeypatch.setattr(sys, 'argv', ['datprl-train', '-opt', str(bad)])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert str(exit_info.value.code).startswith(f'datprl-train: error: {bad}: 2 problem(s)')
    monkeypatch.setattr(sys, 'argv', ['datprl-train', '-opt', str(bad), '--debug'])
    with pytest.raises(OptionFileError):  # --debug: the exception (and its traceback) comes through
        train.main()


REAL_UNWRITABLE_REASON = folders.unwritable_reason


def read_only(monkeypatch, *folders_):
    """Only ``folders_`` behave as read-only mounts (the tests run as root, whom permissions do not stop; a real
    read-only bind mount gives the same answer through ``os.access``)."""
    names = {str(f) for f in folders_}
    monkeypatch.setattr(folders, 'unwritable_reason', lambda path: 'on a read-only file system'
                        if os.path.abspath(path) in names else REAL_UNWRITABLE_REASON(path))


def busy_rename(src, dst):
    """``os.rename`` of a folder that is itself a read-only mount (``unshare -m``, ``mount --bind -o ro``)."""
    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), src, dst)


def test_read_only_experiments_or_results_folder_is_named_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    experiments, results = tmp_path / 'experiments', tmp_path / 'results'
    experiments.mkdir()
    results.mkdir()
    read_only(monkeypatch, experiments, results)
    runs = [(train.main, 'datprl-train', TRAIN_FILE, 'the experiment folder', experiments / 'datprl_md_mini'),
            (test_runner.main, 'datprl-test', TEST_FILE, 'the results folder', results / 'datprl_md_mini_test')]
    for main, prog, option_file, what, folder in runs:
        monkeypatch.setattr(sys, 'argv', [prog, '-opt', option_file])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == (
            f'{prog}: error: {what} {folder} cannot be written: {folder.parent} is on a read-only file system. Run '
            f'from a writable folder (outputs go under the current directory), or make {folder.parent} writable.')
    assert os.listdir(experiments) == [] and os.listdir(results) == []  # nothing created, moved or read

    (results / 'datprl_md_mini_test').mkdir()  # itself a read-only mount: BasicSR cannot move it aside
    monkeypatch.setattr(folders, 'unwritable_reason', REAL_UNWRITABLE_REASON)
    monkeypatch.setattr(os, 'rename', busy_rename)
    monkeypatch.setattr(sys, 'argv', ['datprl-test', '-opt', TEST_FILE])
    with pytest.raises(SystemExit) as exit_info:
        test_runner.main()
    assert exit_info.value.code.startswith(f'datprl-test: error: the output folder {results}/datprl_md_mini_test '
                                           f'cannot be moved aside to {results}/datprl_md_mini_test_archived_')
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    (experiments / 'datprl_md_mini').mkdir()  # --auto_resume writes into the run's own folder: that is checked
    read_only(monkeypatch, experiments / 'datprl_md_mini')
    monkeypatch.setattr(sys, 'argv', ['datprl-train', '-opt', TRAIN_FILE, '--auto_resume'])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert exit_info.value.code.startswith(f'datprl-train: error: the experiment folder {experiments}/datprl_md_mini '
                                           f'cannot be written: {experiments}/datprl_md_mini is on a read-only file '
                                           'system.')
    assert 'Traceback' not in capsys.readouterr().err


def test_a_key_set_twice_is_an_error(tmp_path):
    path = tmp_path / 'twice.yml'
    path.write_text('name: x\ntrain:\n  total_iter: 10\n  total_iter: 20\n')
    with pytest.raises(OptionFileError, match=r"twice\.yml, line 4: key 'total_iter' is set twice in one mapping "
                                              r'\(first on line 3\)'):
        load_option_file(str(path))


CHECKPOINT_OF_ANOTHER_NETWORK = dict(
    name='other_net', model_type='DATPRLModel', scale=1, num_gpu=0, manual_seed=0,
    network_g=dict(SMALL_PROMPTS, domain_pool_size=2, degradation_pool_size=2, domain_prompt_dim=8,
                   degradation_prompt_dim=8, domain_top_k=1, degradation_top_k=1),
    path={'strict_load_g': True, 'resume_state': None},
    train=dict(optim_g={'type': 'Adam', 'lr': 1e-3}, scheduler={'type': 'MultiStepLR', 'milestones': [10]},
               total_iter=2, pixel_opt={'type': 'L1Loss', 'loss_weight': 1.0}),
    logger={'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False})


@pytest.mark.slow
def test_runner_prints_a_data_or_checkpoint_error_as_one_message(tmp_path):
    gt, lq = write_pairs(str(tmp_path / 'data'), 2, (32, 32))
    net = PaddedRestormer(**{k: v for k, v in TINY_NET.items() if k != 'type'})
    torch.save({'params': net.state_dict()}, tmp_path / 'restormer.pth')
    opt = copy.deepcopy(CHECKPOINT_OF_ANOTHER_NETWORK)
    opt['path']['pretrain_network_g'] = str(tmp_path / 'restormer.pth')
    opt['datasets'] = {'train': dict(name='t', type='DATPRLMultiDomainDataset', gt_size=16, batch_size_per_gpu=2,
                                     num_worker_per_gpu=0, dataset_enlarge_ratio=1,
                                     datasets=[dict(name='s', domain='d', task='t', dataroot_gt=gt, dataroot_lq=lq,
                                                    io_backend={'type': 'disk'})])}
    path = tmp_path / 'other.yml'
    path.write_text(yaml.safe_dump(opt))
    done = subprocess.run([sys.executable, '-m', 'datprl_arch.train', '-opt', str(path)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()
    assert last[-1].startswith(f"datprl-train: error: {tmp_path / 'restormer.pth'} does not fit DATPRLRestormer: ")


# ------------------------------------------------------------------------------------------------ quiet results
def test_mixed_formats_and_disagreeing_labels_are_warned_at_construction(tmp_path, log_records):
    gt_dir, lq_dir = tmp_path / 'gt', tmp_path / 'lq'
    gt_dir.mkdir()
    lq_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(gt_dir / f'c{i}.png'), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        cv2.imwrite(str(lq_dir / f'c{i}.png'), rng.integers(0, 255, (16, 16), dtype=np.uint8))
        cv2.imwrite(str(gt_dir / f'd{i}.png'), rng.integers(0, 65535, (16, 16), dtype=np.uint16))
        cv2.imwrite(str(lq_dir / f'd{i}.png'), rng.integers(0, 255, (16, 16), dtype=np.uint8))

    def dataset(name, phase, domain, **extra):
        return build_dataset(dict(name=name, type='DATPRLMultiDomainDataset', phase=phase, gt_size=16, **extra,
                                  datasets=[dict(name='src', domain=domain, task='t', dataroot_gt=str(gt_dir),
                                                 dataroot_lq=str(lq_dir), io_backend={'type': 'disk'})]))

    train_set = dataset('train', 'train', 'naturall')
    text = messages(log_records)
    assert "source 'src': 2 of 4 pairs have a grayscale LQ with a colour GT (e.g. LQ " in text
    assert "source 'src': 2 of 4 pairs have a 16-bit GT with a 8-bit LQ (e.g. LQ " in text
    val_set = dataset('val', 'val', 'natural')
    assert label_warnings(train_set, [val_set]) == [
        "validation set 'val': domain name(s) ['natural'] do not occur in the training set 'train' (['naturall']), "
        'and the two do not declare the same `domains:` list. A typo? Declare the same `domains:` list in every '
        'dataset to make such names an error.']
    declared = dict(domains=['natural', 'naturall'])
    assert label_warnings(dataset('train', 'train', 'naturall', **declared),
                          [dataset('val', 'val', 'natural', **declared)]) == []


def test_missing_description_files_are_named(tmp_path):
    real = tmp_path / 'a.json'
    real.write_text(json.dumps({'x.png': 'a rainy street'}))
    opt = model_opt(tmp_path, use_clip_constraint=True, text_encoder='hash',
                    text_description_paths=[str(real), str(tmp_path / 'missing.json')])
    opt['network_g'] = dict(CHECKPOINT_OF_ANOTHER_NETWORK['network_g'])
    with pytest.raises(OptionFileError, match=r"train.text_description_paths: 1 of 2 description file\(s\) do not "
                                              rf"exist: \['{tmp_path / 'missing.json'}'\]"):
        build_model(opt)
