"""The main job end to end on a reduced budget: MD-Mini (two sources) -> BasicSR's training runner with the demo's
option file -> the benchmark against the input -> the ablation over configurations and seeds."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import yaml

import datprl_arch  # noqa: F401
from datprl_arch import mdmini
from datprl_arch.evaluation.ablation import markdown, summarize
from datprl_arch.options import load_option_file

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
SOURCES = ('natural_derain', 'natural_clean')
TIMEOUT_S = 300


def _report(values):
    """A benchmark report of checkpoints ``{label: (path, {set: psnr_out})}`` on sets with input PSNR 20."""
    rows, checkpoints = [], []
    for label, (path, outs) in values.items():
        checkpoints.append({'label': label, 'path': path, 'parameters': 100 if 'base' in label else 120})
        rows += [{'set': s, 'checkpoint': label, 'psnr_in': 20.0, 'psnr_out': v, 'gain_psnr': v - 20.0}
                 for s, v in outs.items()]
    overall = [{'group': 'all', 'checkpoint': label, 'psnr_in': 20.0,
                'psnr_out': sum(outs.values()) / len(outs), 'gain_psnr': sum(outs.values()) / len(outs) - 20}
               for label, (_, outs) in values.items()]
    return {'checkpoints': checkpoints, 'rows': rows,
            'aggregates': {'domain': [dict(r, group='natural') for r in overall], 'overall': overall}}


def test_ablation_summary_is_the_mean_and_spread_over_seeds():
    report = _report({'base0': ('/r/base0.pth', {'a': 21.0, 'b': 22.0}),
                      'base1': ('/r/base1.pth', {'a': 23.0, 'b': 22.0}),
                      'full0': ('/r/full0.pth', {'a': 24.0, 'b': 20.0}),
                      'full1': ('/r/full1.pth', {'a': 24.0, 'b': 21.0})})
    runs = {'base': [(0, '/r/base0.pth'), (1, '/r/base1.pth')], 'full': [(0, '/r/full0.pth'), (1, '/r/full1.pth')]}
    summary = summarize(report, runs)
    set_a = next(r for r in summary['rows'] if r['level'] == 'set' and r['group'] == 'a')
    assert set_a['psnr_in'] == 20.0
    assert set_a['configs']['base'] == pytest.approx({'psnr_out': 22.0, 'psnr_out_std': 2 ** 0.5, 'gain_psnr': 2.0,
                                                      'gain_psnr_std': 2 ** 0.5, 'n_seeds': 2})
    assert set_a['configs']['full']['psnr_out_std'] == 0.0
    overall = next(r for r in summary['rows'] if r['level'] == 'overall')
    assert overall['configs']['full']['psnr_out'] == pytest.approx((22.0 + 22.5) / 2)
    assert summary['configs']['base'] == {'parameters': 100, 'trainable_per_stage': [], 'seeds': [0, 1]}
    summary['configs']['full']['trainable_per_stage'] = [100, 1234]
    text = markdown(summary, {'base': 0.25, 'full': None})
    assert '| trainable per stage | | | all | 100 / 1,234 |' in text
    assert '| set | a | 20.00 | 22.00 (+2.00 ± 1.41) | 24.00 (+4.00 ± 0.00) |' in text
    assert '| s / training step | | | 0.250 | - |' in text and 'seeds 0, 1' in text


def test_ablation_table_of_a_file_with_clean_sets_gives_their_psnr_against_the_input():
    """Clean sets (the unseen check's) have no input PSNR and no gain: their cell is the restored PSNR ± sd."""
    report = _report({'base0': ('/r/base0.pth', {'a': 21.0, 'clean': 40.0}),
                      'base1': ('/r/base1.pth', {'a': 23.0, 'clean': 44.0})})
    for row in report['rows']:
        if row['set'] == 'clean':
            row.update(psnr_in=None, gain_psnr=None)
    summary = summarize(report, {'base': [(0, '/r/base0.pth'), (1, '/r/base1.pth')]})
    text = markdown(summary, {'base': None})
    assert '| set | clean | - | 42.00 ± 2.83 |' in text
    assert '| set | a | 20.00 | 22.00 (+2.00 ± 1.41) |' in text


def _reduced(option_file, out, tmp_path, keep, **changes):
    """The demo option file on the reduced MD-Mini in ``out``: only the sets of ``keep``, a tiny budget."""
    text = open(osp.join(ROOT, option_file)).read().replace('datasets/md_mini', out)
    opt = yaml.safe_load(text)
    if 'train' in opt['datasets']:
        opt['datasets']['train']['datasets'] = [s for s in opt['datasets']['train']['datasets'] if s['name'] in keep]
        opt['datasets']['train'].update(batch_size_per_gpu=2, num_worker_per_gpu=0, gt_size=32)
    opt['datasets'] = {k: v for k, v in opt['datasets'].items() if k == 'train' or
                       any(k.endswith(name) for name in keep)}
    for key, value in changes.items():
        section, _, name = key.partition('__')
        (opt.setdefault(section, {}) if name else opt)[name or section] = value
    path = tmp_path / osp.basename(option_file)
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


def _run(args, cwd):
    done = subprocess.run([sys.executable, '-m', *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_demo_trains_then_benchmarks_and_the_ablation_compares_seeds(tmp_path):
    out = str(tmp_path / 'md_mini')
    mdmini.build(out, seed=0, sources=SOURCES, unseen=False)
    _run(['datprl_arch.tools.encode_descriptions', *[osp.join(out, s, 'descriptions.json') for s in SOURCES],
          '--out', osp.join(out, 'texts.pt'), '--encoder', 'hash'], tmp_path)
    budget = dict(train__total_iter=4, train__warmup_iter=-1, val__val_freq=4, logger__print_freq=2,
                  logger__save_checkpoint_freq=4)
    train = _reduced('options/demo/md_mini_train.yml', out, tmp_path, SOURCES, **budget)
    test = _reduced('options/demo/md_mini_test.yml', out, tmp_path, ('natural_derain',))
    _run(['datprl_arch.train', '-opt', train], tmp_path)
    checkpoint = tmp_path / 'experiments' / 'datprl_md_mini' / 'models' / 'net_g_latest.pth'
    assert checkpoint.is_file()
    printed = _run(['datprl_arch.benchmark', '-opt', test, '--quiet'], tmp_path)
    assert 'natural_derain' in printed and 'samples.png' in printed
    results = tmp_path / 'results' / 'datprl_md_mini_test'
    report = json.load(open(results / 'report.json'))
    (row,) = report['rows']
    assert (row['domain'], row['task'], row['n_images']) == ('natural', 'derain', 12)
    assert row['psnr_in'] < row['psnr_in'] + abs(row['gain_psnr']) + 1 and row['gain_psnr'] == pytest.approx(
        row['psnr_out'] - row['psnr_in'])
    assert {p.name for p in results.iterdir()} >= {'report.md', 'report.csv', 'report.json', 'samples.png'}

    baseline = _reduced('options/demo/md_mini_baseline.yml', out, tmp_path, SOURCES, **budget)
    printed = _run(['datprl_arch.ablation', '--configs', baseline, train, '--seeds', '0', '1', '--test', test,
                    '--quiet'], tmp_path)
    summary = json.load(open(tmp_path / 'results' / 'datprl_md_mini_ablation' / 'ablation.json'))
    assert list(summary['configs']) == ['datprl_md_mini_baseline', 'datprl_md_mini']
    assert summary['configs']['datprl_md_mini_baseline']['parameters'] < summary['configs']['datprl_md_mini'][
        'parameters']
    overall = next(r for r in summary['rows'] if r['level'] == 'overall')
    assert all(c['n_seeds'] == 2 for c in overall['configs'].values())
    assert '| overall | all |' in printed
    assert load_option_file(train)['name'] == 'datprl_md_mini'
