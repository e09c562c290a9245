"""The release model shipped in the package: a safetensors file that loads without pickle, matches the model card,
rebuilds without an option file and reproduces the card's test figures."""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import datprl_arch  # noqa: F401
from datprl_arch import mdmini
from basicsr.archs import build_network
from datprl_arch.utils.checkpoint import NETWORK_KEY, SAFETENSORS_PARAM_KEY, file_sha256, read_checkpoint
from datprl_arch.weights import RELEASE_FILE

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CARD = osp.join(ROOT, 'docs', 'model_card.md')
MAX_BYTES = 10 * 1024 * 1024
PSNR_TOLERANCE_DB = 0.05  # the card's per-set PSNR, reproduced by a fresh benchmark
PROBE_SIDE = 32
TIMEOUT_S = 600


def card_test_rows() -> dict:
    """``{set: restored PSNR}`` of the card's test table."""
    text = open(CARD, encoding='utf-8').read()
    section = text.split('\n## test\n', 1)[1].split('\n## ', 1)[0]
    return {m[1]: float(m[2]) for m in re.finditer(r'^\| (md_mini_test_\w+) \| \d+ \| [\d.]+ \| ([\d.]+) \|', section,
                                                   re.M)}


def test_shipped_file_is_small_safetensors_named_by_the_model_card():
    assert osp.getsize(RELEASE_FILE) <= MAX_BYTES
    with safe_open(RELEASE_FILE, framework='pt') as f:  # a safetensors header: no pickle anywhere
        network = json.loads(f.metadata()[NETWORK_KEY])
    assert network['type'] == 'DATPRLRestormer'
    assert f'sha256 `{file_sha256(RELEASE_FILE)}`' in open(CARD, encoding='utf-8').read()


def test_shipped_file_rebuilds_without_an_option_file():
    checkpoint = read_checkpoint('release')
    net = build_network(dict(checkpoint[NETWORK_KEY])).eval()
    net.load_state_dict(checkpoint[SAFETENSORS_PARAM_KEY])
    torch.manual_seed(0)
    with torch.no_grad():
        out = net(torch.rand(1, 3, PROBE_SIDE, PROBE_SIDE))
    assert out.shape == (1, 3, PROBE_SIDE, PROBE_SIDE) and torch.isfinite(out).all()


@pytest.mark.slow
def test_benchmark_without_ckpt_reproduces_the_model_card(tmp_path):
    """MD-Mini's default build, then ``datprl-benchmark`` with no ``--ckpt`` on an option file that names no
    checkpoint: the release model, every test set's PSNR as the card states it."""
    mdmini.build(str(tmp_path / 'datasets' / 'md_mini'), seed=0, unseen=False)
    opt = open(osp.join(ROOT, 'options', 'demo', 'md_mini_test.yml'), encoding='utf-8').read()
    opt = re.sub(r'pretrain_network_g: .*', 'pretrain_network_g: ~', opt)
    (tmp_path / 'test.yml').write_text(opt.replace('name: datprl_md_mini_test', 'name: shipped', 1))
    env = dict(os.environ, OMP_NUM_THREADS='2')
    run = subprocess.run([sys.executable, '-m', 'datprl_arch.benchmark', '-opt', 'test.yml', '--quiet'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    report = json.load(open(tmp_path / 'results' / 'shipped' / 'report.json'))
    assert {c['label'] for c in report['checkpoints']} == {'release'}
    measured = {r['set']: r['psnr_out'] for r in report['rows']}
    expected = card_test_rows()
    assert len(expected) == 9 and set(expected) <= set(measured)
    for name, psnr in expected.items():
        assert abs(measured[name] - psnr) <= PSNR_TOLERANCE_DB, (name, measured[name], psnr)
