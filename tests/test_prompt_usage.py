"""Prompt-usage statistics: windows of hard top-k counts, re-initialisation of unused prompts, and both across ranks."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from datprl_arch.archs.prompt.pool import PromptPool
from datprl_arch.models.prompt_usage import PromptUsageTracker, reinitialise_prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_usage_tracker_two_steps_report_and_reset():
    tracker = PromptUsageTracker({'task': 4, 'domain': 2}, update_freq=2)
    tracker.update('task', torch.tensor([[0, 1], [0, 2]]))
    tracker.update('domain', torch.tensor([[1], [1]]))
    assert tracker.step(1) is None
    tracker.update('task', torch.tensor([[0, 1]]))
    report = tracker.step(2)
    assert report['task'].counts.tolist() == [3, 2, 1, 0]
    assert report['task'].selections == 6 and report['task'].unused == [3]
    assert report['task'].fractions.tolist() == pytest.approx([0.5, 1 / 3, 1 / 6, 0.0])
    assert report['domain'].counts.tolist() == [0, 2] and report['domain'].unused == [0]
    assert 'never selected [3]' in report['task'].summary()
    # a new window starts from zero; an empty window reports nothing unused
    tracker.update('task', torch.tensor([[3, 2]]))
    report = tracker.step(4)
    assert report['task'].counts.tolist() == [0, 0, 1, 1] and report['domain'].unused == []


def test_usage_tracker_errors():
    tracker = PromptUsageTracker({'task': 3}, update_freq=10)
    with pytest.raises(KeyError, match="unknown prompt pool 'domain'"):
        tracker.update('domain', torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"pool 'task' must lie in \[0, 3\), got 5\.\.5"):
        tracker.update('task', torch.tensor([[5]]))
    with pytest.raises(ValueError, match='stats_update_freq must be a positive'):
        PromptUsageTracker({'task': 3}, update_freq=0)


def test_reinitialise_prompts_resets_rows_and_their_adam_state():
    torch.manual_seed(3)
    pool = PromptPool(4, 6, 2, 2)
    optimizer = torch.optim.Adam(pool.parameters(), lr=1e-2)
    (pool.prompt_keys.square().sum() + pool.prompt_values.square().sum()).backward()
    optimizer.step()
    keys, values = pool.prompt_keys.detach().clone(), pool.prompt_values.detach().clone()
    reinitialise_prompts(pool, [2], optimizer)
    assert torch.equal(pool.prompt_keys[[0, 1, 3]], keys[[0, 1, 3]])
    assert not torch.equal(pool.prompt_keys[2], keys[2]) and not torch.equal(pool.prompt_values[2], values[2])
    for param in (pool.prompt_keys, pool.prompt_values):
        state = optimizer.state[param]
        for moment in ('exp_avg', 'exp_avg_sq'):
            assert state[moment][2].abs().sum() == 0 and state[moment][0].abs().sum() > 0


RANK_SCRIPT = textwrap.dedent('''
    import importlib.util, os, sys, torch, torch.distributed as dist

    def load(relative):  # both modules need only torch: skip the package import (basicsr, cv2: seconds per rank)
        spec = importlib.util.spec_from_file_location(os.path.basename(relative)[:-3], relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    PromptPool = load('datprl_arch/archs/prompt/pool.py').PromptPool
    usage = load('datprl_arch/models/prompt_usage.py')
    PromptUsageTracker, reinitialise_prompts = usage.PromptUsageTracker, usage.reinitialise_prompts

    rank, init_file, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group('gloo', init_method='file://' + init_file, rank=rank, world_size=2)
    tracker = PromptUsageTracker({'task': 3}, update_freq=1)
    tracker.update('task', torch.tensor([[0, 1]]) if rank == 0 else torch.tensor([[0, 0], [1, 0]]))
    counts = tracker.step(1)['task'].counts
    # a training state: rank 0 saves the counts of both ranks; on resume every rank loads rank 0's file
    tracker.update('task', torch.tensor([[2, 2]]) if rank == 0 else torch.tensor([[1, 2]]))
    tracker.consolidate()
    saved = tracker.state()['task']
    consolidated = saved.clone()
    dist.broadcast(saved, src=0)
    resumed = PromptUsageTracker({'task': 3}, update_freq=1)
    resumed.load_state({'task': saved})
    resumed.update('task', torch.tensor([[0]]))
    after_resume = resumed.step(1)['task'].counts
    torch.manual_seed(rank)
    pool = PromptPool(3, 4, 2, 2)
    reinitialise_prompts(pool, [1])
    torch.save({'counts': counts, 'keys': pool.prompt_keys.detach(), 'values': pool.prompt_values.detach(),
                'consolidated': consolidated, 'after_resume': after_resume}, os.path.join(out_dir, f'{rank}.pt'))
    dist.destroy_process_group()
''')


def test_usage_counts_are_summed_saved_once_and_reinitialised_rows_shared_across_ranks(tmp_path):
    script = tmp_path / 'rank.py'
    script.write_text(RANK_SCRIPT)
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / 'init'), str(tmp_path)], cwd=REPO)
             for r in (0, 1)]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f'{r}.pt') for r in (0, 1))
    assert r0['counts'].tolist() == r1['counts'].tolist() == [4, 2, 0]
    assert r0['consolidated'].tolist() == [0, 1, 3] and r1['consolidated'].tolist() == [0, 0, 0]
    assert r0['after_resume'].tolist() == r1['after_resume'].tolist() == [2, 1, 3]  # [2, 2, 6] if loaded twice
    # different seeds built different pools; rank 0's re-initialised row 1 reached rank 1, the other rows stay
    assert torch.equal(r0['keys'][1], r1['keys'][1]) and torch.equal(r0['values'][1], r1['values'][1])
    assert not torch.equal(r0['keys'][2], r1['keys'][2])
