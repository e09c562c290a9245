"""Description embeddings: the encode_descriptions CLI, the file format, lookup by GT path with fallbacks, errors."""
import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from datprl_arch.priors.descriptions import DescriptionError, read_descriptions
from datprl_arch.priors.embeddings import EMBEDDINGS_FORMAT, DescriptionEmbeddings, load_description_embeddings
from datprl_arch.priors.encoders import (HASH_DIM, HASH_ENCODER, clip_encoder, encode_files, hash_encoder,
                                         sentence_transformers_encoder)
from datprl_arch.tools.encode_descriptions import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAIN = {'__generator__': 'test', '0001.png': 'A rainy street with parked cars at night.',
        '0002.png': 'A rainy harbour with boats.'}
MRI = {'0001.png': 'An axial brain MRI slice.', 'scan_7.png': 'A sagittal knee MRI slice.'}


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(data, f)
    return str(path)


@pytest.fixture
def described(tmp_path):
    """Two sources in the dataset layout <source>/descriptions.json; '0001.png' is in both."""
    return (write_json(tmp_path / 'Rain100L' / 'descriptions.json', RAIN),
            write_json(tmp_path / 'MRI' / 'descriptions.json', MRI))


def start_cli(*args, hash_seed):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    return subprocess.Popen([sys.executable, '-m', 'datprl_arch.tools.encode_descriptions', *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_hash_encoder_writes_a_file_the_loader_reads_deterministically(described, tmp_path):
    rain, mri = described
    outputs = [tmp_path / 'priors0.pt', tmp_path / 'priors1.pt']
    # a second process with another PYTHONHASHSEED: the encoder must not depend on Python's salted hash()
    run = start_cli(rain, f'mri={mri}', '--encoder', 'hash', '--out', str(outputs[0]), hash_seed='12345')
    assert main([rain, f'mri={mri}', '--encoder', 'hash', '--out', str(outputs[1])]) == 0
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert "Wrote 4 description embeddings (hash-ngram-v1, dim 1024) of sources {'Rain100L': 2, 'mri': 2}" in stderr
    assert sorted(os.listdir(tmp_path)) == ['MRI', 'Rain100L', 'priors0.pt', 'priors1.pt']  # no temporary left
    raw = torch.load(outputs[0], weights_only=True)
    assert raw['format'] == EMBEDDINGS_FORMAT and raw['version'] == 1 and raw['dim'] == HASH_DIM
    assert raw['encoder'] == HASH_ENCODER
    assert raw['names'] == ['0001.png', '0002.png', '0001.png', 'scan_7.png']
    assert raw['sources'] == ['Rain100L', 'Rain100L', 'mri', 'mri']
    assert raw['embeddings'].dtype == torch.float32 and raw['embeddings'].shape == (4, HASH_DIM)
    assert torch.allclose(raw['embeddings'].norm(dim=1), torch.ones(4))
    assert torch.equal(raw['embeddings'], torch.load(outputs[1], weights_only=True)['embeddings'])
    index, embeddings = load_description_embeddings(str(outputs[0]))
    # '0001' is described in two sources: only reachable with its source
    assert index == {'0002.png': 1, '0002': 1, 'scan_7.png': 3, 'scan_7': 3}
    assert torch.equal(embeddings, raw['embeddings'])


def test_hash_encoder_similarity_follows_wording():
    encode = hash_encoder(256)
    a, b, c = torch.nn.functional.normalize(encode(['a rainy street at night', 'a rainy street at dusk',
                                                   'axial brain MRI']), dim=1)
    assert (a @ b) > 0.5 > abs(a @ c)
    assert torch.equal(encode(['Rainy  STREET']), encode(['rainy street']))


def test_lookup_by_path_with_and_without_extension_and_source(described):
    rain, mri = described
    table = encode_files([('Rain100L', rain), ('MRI', mri)], hash_encoder(64), HASH_ENCODER)
    rows = table.embeddings
    got = table.lookup(['/data/Rain100L/gt/0001.png', '0001', 'lmdb_key/0002', '/x/scan_7.jpg'],
                       ['Rain100L', 'MRI', 'Rain100L', 'MRI'])
    assert torch.equal(got, rows[[0, 2, 1, 3]])
    assert torch.equal(table.lookup(['0002.png', 'scan_7']), rows[[1, 3]])  # unambiguous names need no source
    with pytest.raises(ValueError, match=r"image name '0001.png' is described in several sources \['MRI', "
                                         r"'Rain100L'\]; pass the sample's source"):
        table.lookup(['0001.png'])


def test_missing_descriptions_fall_back_to_the_source_mean_logged_once(described, caplog):
    rain, mri = described
    table = encode_files([('Rain100L', rain), ('MRI', mri)], hash_encoder(64), HASH_ENCODER)
    rows = table.embeddings
    rain_mean = torch.nn.functional.normalize(rows[0] + rows[1], dim=0)
    all_mean = torch.nn.functional.normalize(rows.sum(dim=0), dim=0)
    logger = logging.getLogger('basicsr')  # BasicSR's root logger does not propagate: listen to it directly
    logger.addHandler(caplog.handler)
    try:
        got = table.lookup(['9999.png', '9998.png', '0002.png', 'x.png'], ['Rain100L', 'Rain100L', 'Rain100L', 'CT'])
        table.lookup(['9997.png'], ['Rain100L'])
    finally:
        logger.removeHandler(caplog.handler)
    assert torch.allclose(got[0], rain_mean) and torch.allclose(got[1], rain_mean)
    assert torch.equal(got[2], rows[1]) and torch.allclose(got[3], all_mean)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "source 'Rain100L' has no description (9999.png)" in messages[0] and 'mean embedding of source' in \
        messages[0]
    assert "source 'CT'" in messages[1] and 'mean of all embeddings' in messages[1]


@pytest.mark.parametrize('content, message', [
    ('[1, 2]', 'must hold a JSON object mapping image names to text, e.g. {"0001.png": "a rainy street"}; got a list'),
    ('{"0001.png": 3}', "key '0001.png' maps to a int, expected a text string"),
    ('{"0001.png": "  "}', "key '0001.png' has an empty description"),
    ('{"__generator__": "x"}', 'holds no descriptions'),
    ('{"0001.png": ', 'is not readable JSON'),
])
def test_bad_descriptions_name_the_file_and_key(tmp_path, content, message):
    path = tmp_path / 'llava_rain.json'
    path.write_text(content)
    with pytest.raises(DescriptionError) as err:
        read_descriptions(str(path))
    assert str(path) in str(err.value) and message in str(err.value)


def test_cli_errors(described, tmp_path, capsys):
    rain, _ = described
    out = str(tmp_path / 'p.pt')
    cases = [
        ([str(tmp_path / 'missing.json'), '--encoder', 'hash', '--out', out],
         f'descriptions file {tmp_path / "missing.json"} does not exist'),
        ([rain, '--out', out], 'no encoder: give --clip-weights PATH, --sentence-transformers DIR or --encoder hash'),
        ([rain, '--encoder', 'hash', '--clip-weights', 'w.pt', '--out', out], 'choose one encoder'),
        ([rain, '--encoder', 'clip', '--out', out], '--encoder clip needs --clip-weights PATH'),
        ([rain, '--clip-weights', str(tmp_path / 'RN50.pt'), '--out', out],
         f'--clip-weights {tmp_path / "RN50.pt"} does not exist'),
        ([rain, '--sentence-transformers', str(tmp_path / 'minilm'), '--out', out],
         f'--sentence-transformers {tmp_path / "minilm"} is not a directory'),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(out)
    assert main([rain, '--encoder', 'hash', '--dim', '8', '--out', out]) == 0
    with pytest.raises(SystemExit):
        main([rain, '--encoder', 'hash', '--out', out])
    assert f'{out} exists; pass --overwrite' in capsys.readouterr().err
    assert main([rain, '--encoder', 'hash', '--dim', '16', '--out', out, '--overwrite']) == 0
    assert DescriptionEmbeddings.load(out).dim == 16


@pytest.mark.skipif(importlib.util.find_spec('open_clip') is not None, reason='open_clip is installed')
def test_clip_without_open_clip_says_what_to_install(tmp_path):
    weights = tmp_path / 'RN50.pt'
    weights.write_bytes(b'not used')
    with pytest.raises(DescriptionError, match=r'needs the optional package open_clip \(pip install open_clip_torch'):
        clip_encoder(str(weights), 'cpu')


@pytest.mark.skipif(importlib.util.find_spec('sentence_transformers') is not None,
                    reason='sentence-transformers is installed')
def test_sentence_transformers_without_the_package_says_so(tmp_path):
    with pytest.raises(DescriptionError, match='needs the optional package sentence-transformers'):
        sentence_transformers_encoder(str(tmp_path), 'cpu')


def test_duplicate_key_of_one_source_is_an_error(described):
    rain, _ = described
    with pytest.raises(DescriptionError, match=f"{rain}: key '0001.png' of source 'Rain100L' is also in {rain}"):
        encode_files([('Rain100L', rain), ('Rain100L', rain)], hash_encoder(8), HASH_ENCODER)


def test_bad_embeddings_files_are_named(tmp_path):
    missing = str(tmp_path / 'none.pt')
    with pytest.raises(FileNotFoundError, match=f'description embeddings file {missing} does not exist; write it '
                                                f'with python -m datprl_arch.tools.encode_descriptions'):
        load_description_embeddings(missing)
    text = tmp_path / 'text.pt'
    text.write_text('hello')
    with pytest.raises(ValueError, match=f'{text} is not a readable description embeddings file'):
        load_description_embeddings(str(text))
    state = tmp_path / 'state.pt'
    torch.save({'params': {}}, state)
    with pytest.raises(ValueError, match=f"{state} is not a description embeddings file: expected a dict with format "
                                         f"'{EMBEDDINGS_FORMAT}'"):
        load_description_embeddings(str(state))
    broken = tmp_path / 'broken.pt'
    torch.save({'format': EMBEDDINGS_FORMAT, 'version': 1, 'names': ['a'], 'sources': 'x',
                'embeddings': torch.ones(1, 2), 'encoder': 'e', 'dim': 2}, broken)
    with pytest.raises(ValueError, match=f"{broken}: key 'sources' must be a list, got str"):
        load_description_embeddings(str(broken))
    with pytest.raises(ValueError, match=r'need N >= 1 names, N sources and an \[N, E\] tensor, got 2 names'):
        DescriptionEmbeddings(['a', 'b'], ['s', 's'], torch.ones(1, 2), 'e')


class FakeOpenClip:
    """Stands in for the optional open_clip package: records how the encoder calls it."""

    def __init__(self):
        self.calls = []

    def load_openai_model(self, path, precision, device):
        self.calls.append((path, precision, device))
        fake = self

        class TextTower(torch.nn.Module):
            def encode_text(self, tokens):
                fake.calls.append(('encode_text', tuple(tokens.shape)))
                return tokens[:, :3].double() + 1  # not unit norm, not float32: the tool normalises

        return TextTower()

    @staticmethod
    def tokenize(texts):
        return torch.tensor([[len(t), 2, 3, 4] for t in texts])


def test_clip_path_loads_local_weights_and_normalises(described, tmp_path, monkeypatch):
    rain, _ = described
    weights = tmp_path / 'RN50.pt'
    weights.write_bytes(b'weights')
    fake = FakeOpenClip()
    monkeypatch.setitem(sys.modules, 'open_clip', fake)
    out = str(tmp_path / 'clip.pt')
    assert main([rain, '--clip-weights', str(weights), '--out', out]) == 0
    assert fake.calls == [(str(weights), 'fp32', 'cpu'), ('encode_text', (2, 4))]
    table = DescriptionEmbeddings.load(out)
    assert table.encoder == 'open_clip:RN50:RN50.pt' and table.dim == 3
    first = torch.tensor([len(RAIN['0001.png']) + 1, 3.0, 4.0])
    assert torch.allclose(table.embeddings[0], first / first.norm())
