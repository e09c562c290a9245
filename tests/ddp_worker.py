"""Test helper for tests/test_distributed.py, started by torchrun: BasicSR's own ``train_pipeline`` (exactly what
``python -m datprl_arch.train`` runs), with the model built by the runner watched from outside. Each rank writes to
``RECORD_DIR``: ``rank<R>.pth`` (its bare network's final weights) and ``rank<R>.json`` (the iterations it trained,
a fingerprint of every batch it got, how often it validated, the files it saved).

    torchrun --nproc_per_node=2 tests/ddp_worker.py RECORD_DIR -opt FILE.yml --launcher pytorch [--auto_resume]
"""
import hashlib
import json
import os
import sys

import torch
from torch import distributed as dist

import datprl_arch  # noqa: F401  (compatibility fixes and registration, before basicsr)
import basicsr.train
from basicsr.models import build_model


def watch(model, record: dict):
    """Record, on this rank, each training batch and iteration, each validation and each file torch.save writes."""
    feed_data, optimize, validate, save = (model.feed_data, model.optimize_parameters, model.nondist_validation,
                                           torch.save)

    def feed_and_record(data):
        if not record['validating']:
            record['batches'].append({'lq_sha1': hashlib.sha1(data['lq'].numpy().tobytes()).hexdigest(),
                                      'sources': [int(s) for s in data['source']]})
        return feed_data(data)

    def optimize_and_record(current_iter):
        record['iters'].append(current_iter)
        return optimize(current_iter)

    def validate_and_record(*args, **kwargs):
        record['validations'] += 1
        record['validating'] = True
        try:
            return validate(*args, **kwargs)
        finally:
            record['validating'] = False

    def save_and_record(obj, path, *args, **kwargs):
        record['saved'].append(os.path.basename(str(path)).split('.tmp')[0])
        return save(obj, path, *args, **kwargs)

    model.feed_data, model.optimize_parameters, model.nondist_validation = (feed_and_record, optimize_and_record,
                                                                            validate_and_record)
    torch.save = save_and_record
    return save


def main() -> None:
    record_dir = sys.argv.pop(1)
    record = {'iters': [], 'batches': [], 'validations': 0, 'validating': False, 'saved': []}
    built = {}

    def build_and_watch(opt):
        built['model'] = model = build_model(opt)
        built['save'] = watch(model, record)
        return model

    basicsr.train.build_model = build_and_watch
    basicsr.train.train_pipeline(os.getcwd())
    torch.save = built['save']
    model, rank = built['model'], dist.get_rank()
    record['world_size'] = dist.get_world_size()
    torch.save(model.get_bare_model(model.net_g).state_dict(), os.path.join(record_dir, f'rank{rank}.pth'))
    with open(os.path.join(record_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(record, f)


if __name__ == '__main__':
    main()
