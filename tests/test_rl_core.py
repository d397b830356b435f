"""RL pieces on hand-computed numbers: CVaR tail filter and schedule, GAE, clipped losses,
KL shaping and the adaptive KL coefficient."""

from __future__ import annotations

import math

import pytest
import torch

from safeft.rl.cvar import keep_count, risk_level, tail_indices
from safeft.rl.ppo import (
    AdaptiveKLController,
    discounted_returns,
    gae,
    masked_whiten,
    ppo_loss,
    response_mask_from,
    shaped_rewards,
)


def test_tail_keeps_exactly_the_lowest_returns():
    returns = torch.tensor([0.5, -2.0, 3.0, -1.0, 0.0, -2.0])
    assert tail_indices(returns, 3).tolist() == [1, 3, 5]
    assert tail_indices(returns, 1).tolist() == [1]  # tie at -2.0: the earlier episode
    assert tail_indices(returns, 6).tolist() == [0, 1, 2, 3, 4, 5]
    kept = tail_indices(returns, 4)
    assert kept.tolist() == [1, 3, 4, 5]
    assert returns[kept].max() <= returns[[i for i in range(6) if i not in kept.tolist()]].min()


def test_schedule_counts_at_boundaries_small():
    # M=10, n=2, alpha=0.5, rho=0.8 -> reaches alpha at iteration ceil(8.0)=8; B=10
    counts = [keep_count(s, 10, 10, 2, 0.5, 0.8) for s in range(10)]
    # it1,2: warm-up; it3: 1-0.5*1/6=0.9167 -> 10; it4: 0.8333 -> 9; it5: 0.75 -> 8 (7.5 up);
    # it6: 0.6667 -> 7; it7: 0.5833 -> 6; it8..10: 0.5 -> 5
    assert counts == [10, 10, 10, 9, 8, 7, 6, 5, 5, 5]
    assert risk_level(2, 10, 2, 0.5, 0.8) == 1.0
    assert risk_level(5, 10, 2, 0.5, 0.8) == pytest.approx(0.75)
    assert risk_level(8, 10, 2, 0.5, 0.8) == 0.5


def test_schedule_paper_imdb_setting():
    # B=128, M=194, n=30, alpha=0.4, rho=0.95: alpha reached at ceil(184.3)=185
    k = lambda it: keep_count(it - 1, 194, 128, 30, 0.4, 0.95)  # noqa: E731
    assert k(1) == k(30) == 128
    assert k(31) == math.ceil((1 - 0.6 / 155) * 128)  # 127.50 -> 128
    assert k(108) == 90  # 1 - 0.6*78/155 = 0.69806 -> 89.35 -> 90
    assert k(184) == 52  # 0.40387*128 = 51.70 -> 52
    assert k(185) == k(194) == 52  # 0.4*128 = 51.2 -> 52
    assert all(k(i) >= k(i + 1) for i in range(1, 194))


def test_schedule_exact_products_do_not_round_up():
    assert keep_count(9, 10, 10, 0, 0.3, 1.0) == 3  # 0.3*10 is 3.0000000000000004 in floats


def test_gae_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 0.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t2: d=2 -> A=2; t1: d=0+0-1=-1 -> A=-1+0.5*2=0; t0: d=1+1-0.5=1.5 -> A=1.5
    assert adv.tolist() == [[1.5, 0.0, 2.0]]
    assert ret.tolist() == [[2.0, 1.0, 2.0]]


def test_gae_ignores_padding():
    rewards = torch.tensor([[1.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 9.0]])
    adv, ret = gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=1.0)
    # t1: d=2-1=1 -> A=1; t0: d=1+0.9*1-0.5=1.4 -> A=1.4+0.9*1=2.3
    assert adv[0].tolist() == pytest.approx([2.3, 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([2.8, 2.0, 0.0])


def test_clipped_losses_hand_computed():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    values = torch.tensor([[1.0, 0.0, 2.0]])
    old_values = torch.full((1, 3), 0.5)
    returns = torch.ones(1, 3)
    loss, st = ppo_loss(logp, old, values, old_values, adv, returns, torch.ones(1, 3), 0.2, 0.2, 0.1)
    # pg: max(-1.5,-1.2)=-1.2, max(-0.5,-0.8)=-0.5, max(1.1,1.1)=1.1 -> mean -0.2
    assert st["pg_loss"] == pytest.approx(-0.2, abs=1e-6)
    # vf: max(0, 0.3^2)=0.09, max(1, 0.7^2)=1, max(1, 0.3^2)=1 -> 0.5*2.09/3
    assert st["vf_loss"] == pytest.approx(0.5 * 2.09 / 3, abs=1e-6)
    assert loss.item() == pytest.approx(-0.2 + 0.1 * 0.5 * 2.09 / 3, abs=1e-6)
    assert st["clipfrac"] == pytest.approx(1 / 3)


def test_clipped_loss_masks_padding():
    z = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), 5.0]])
    loss, st = ppo_loss(logp, z, z, z, torch.tensor([[1.0, 100.0]]), z, torch.tensor([[1.0, 0.0]]), 0.2, 0.2, 0.1)
    assert st["pg_loss"] == pytest.approx(-1.2, abs=1e-6)


def test_shaped_rewards_and_return():
    scores = torch.tensor([2.0])
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0]])
    rewards, kl = shaped_rewards(scores, logp, ref, torch.tensor([[1.0, 1.0, 0.0]]), kl_coef=0.5)
    assert kl.tolist() == [[0.5, 0.0, 0.0]]
    assert rewards.tolist() == [[-0.25, 2.0, 0.0]]  # the score lands on the last real token
    assert discounted_returns(rewards, 1.0).tolist() == [1.75]
    assert discounted_returns(rewards, 0.5).tolist() == [-0.25 + 0.5 * 2.0]


def test_adaptive_kl_moves_toward_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(12.0, 128) == pytest.approx(0.2 * (1 + 0.2 * 128 / 10000))  # KL too high: β up (clipped)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(3.0, 128) == pytest.approx(0.2 * (1 - 0.2 * 128 / 10000))  # KL too low: β down
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(6.6, 100) == pytest.approx(0.2 * (1 + 0.1 * 100 / 10000))  # within the clip
    assert AdaptiveKLController(0.2, 6.0, 10).update(6.0, 5) == pytest.approx(0.2)
    assert AdaptiveKLController(0.3, None, 10).update(100.0, 5) == 0.3  # fixed coefficient


def test_whiten_and_response_mask():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    w = masked_whiten(x, m)
    assert w[0, :2].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-6)
    assert w[0, 2].item() == 0.0
    ids = torch.tensor([[5, 2, 2, 7], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert response_mask_from(ids, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
