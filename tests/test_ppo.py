"""The PPO core's losses: policy gradient at ratio 1, clipping direction, KL terms, aggregation."""

import torch

from rlzoo.ppo import aggregate, clipped_surrogate, kl_k1, kl_k3, masked_whiten, value_loss


def test_surrogate_gradient_at_ratio_one_is_the_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    actions = torch.tensor([1, 4, 0])
    advantages = torch.tensor([0.7, -1.3, 0.2])
    logp = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1)
    loss, ratio = clipped_surrogate(logp, logp.detach(), advantages, clip_eps=0.2)
    assert torch.allclose(ratio, torch.ones(3))
    (grad_ppo,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (grad_pg,) = torch.autograd.grad(-(advantages * logp).sum(), logits)
    assert torch.allclose(grad_ppo, grad_pg, atol=1e-6)


def _grad_wrt_logp(logp_value, old, adv, eps=0.2):
    logp = torch.tensor([logp_value], requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.tensor([old]), torch.tensor([adv]), eps)
    loss.sum().backward()
    return logp.grad.item()


def test_clipping_stops_the_gradient_only_in_the_direction_the_advantage_favours():
    old = 0.0
    up, down = torch.log(torch.tensor(1.5)).item(), torch.log(torch.tensor(0.5)).item()
    # positive advantage: ratio above 1 + eps gets no further push up; below 1 - eps still pushed up
    assert _grad_wrt_logp(up, old, 1.0) == 0.0
    assert _grad_wrt_logp(down, old, 1.0) < 0.0  # descending the loss raises logp
    # negative advantage: ratio below 1 - eps gets no further push down; above 1 + eps still pushed down
    assert _grad_wrt_logp(down, old, -1.0) == 0.0
    assert _grad_wrt_logp(up, old, -1.0) > 0.0
    # inside the trust region the gradient flows in both cases
    inside = torch.log(torch.tensor(1.1)).item()
    assert _grad_wrt_logp(inside, old, 1.0) < 0.0 and _grad_wrt_logp(inside, old, -1.0) > 0.0


def test_kl_terms_vanish_when_policy_equals_reference_and_k3_is_nonnegative():
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(4, 7), -1)
    assert torch.all(kl_k3(logp, logp) == 0) and torch.all(kl_k1(logp, logp) == 0)
    other = torch.log_softmax(torch.randn(4, 7), -1)
    assert torch.all(kl_k3(logp, other) >= 0)
    assert torch.all(kl_k3(torch.zeros(1), torch.tensor([-100.0]), clamp=10.0) <= 10.0)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    old, ret = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    values = torch.tensor([0.5, -0.5])
    per_token = value_loss(values, old, ret, torch.ones(2), clip=0.2)
    # row 0: unclipped (0.5-1)^2 = .25, clipped (0.2-1)^2 = .64 -> .32; row 1: 2.25 vs .64 -> 1.125
    assert torch.allclose(per_token, torch.tensor([0.32, 1.125]))


def test_aggregations_sum_over_micro_batches_to_the_minibatch_value():
    torch.manual_seed(2)
    loss, mask = torch.rand(6, 5), (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    for mode, denom in [("token-mean", mask.sum().item()), ("seq-mean-token-mean", 6.0), ("seq-mean-token-sum-norm", 6.0)]:
        whole = aggregate(loss, mask, mode, denom, norm_tokens=5)
        parts = aggregate(loss[:2], mask[:2], mode, denom, 5) + aggregate(loss[2:], mask[2:], mode, denom, 5)
        assert torch.allclose(whole, parts)
    assert torch.allclose(aggregate(loss, mask, "token-mean", mask.sum().item()), (loss * mask).sum() / mask.sum())
    per_seq = ((loss * mask).sum(-1) / mask.sum(-1)).mean()
    assert torch.allclose(aggregate(loss, mask, "seq-mean-token-mean", 6.0), per_seq)


def test_masked_whiten():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[0, 3] == 0 and abs(w[0, :3].mean().item()) < 1e-6
    assert abs(w[0, :3].pow(2).mean().item() - 1.0) < 1e-4
