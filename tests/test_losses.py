"""Tests for losses.py: hand-worked cases first, then properties, then gradcheck."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import losses
from losses import (dpo_loss, reward_loss, sequence_logps, sequence_logps_from_hidden, sft_loss,
                    token_logps, token_logps_from_hidden)

LN2, LN3 = math.log(2), math.log(3)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a worked example
#
# Vocabulary {0, 1, 2}; sequences of T=3 tokens: token 0 is the prompt, tokens
# 1-2 the response, so loss_mask = [F, T, T]. After the shift, logits at
# position 0 score token 1 and logits at position 1 score token 2; position 2's
# logits score nothing.
#   chosen   = [0, 1, 2],  rejected = [0, 2, 1]
# Policy logits (same for both sequences):
#   pos 0: [0, ln2, 0]  -> softmax [1/4, 1/2, 1/4]
#   pos 1: [0, 0, 0]    -> softmax [1/3, 1/3, 1/3]
#   pos 2: [5, -5, 0]   (unused)
# chosen:   log 1/2 + log 1/3 = -ln6    rejected: log 1/4 + log 1/3 = -ln12
# Reference logits all 0: every token has log 1/3, so both sequences: -2 ln3 = -ln9.
# Margin h = (-ln6 + ln9) - (-ln12 + ln9) = ln12 - ln6 = ln2.

def _worked_example():
    pol = torch.tensor([[0.0, LN2, 0.0], [0.0, 0.0, 0.0], [5.0, -5.0, 0.0]])
    logits = torch.stack([pol, pol.clone()]).requires_grad_()  # [2, 3, 3]: chosen, rejected
    labels = torch.tensor([[0, 1, 2], [0, 2, 1]])
    mask = torch.tensor([[False, True, True], [False, True, True]])
    return logits, labels, mask


def test_worked_example_sequence_logps():
    logits, labels, mask = _worked_example()
    expected = torch.tensor([-math.log(6), -math.log(12)])
    torch.testing.assert_close(sequence_logps(logits, labels, mask), expected)
    # average: divided by the 2 response tokens
    torch.testing.assert_close(sequence_logps(logits, labels, mask, average=True), expected / 2)
    # per token: [-ln2, -ln3] and [-2 ln2, -ln3]
    torch.testing.assert_close(token_logps(logits, labels, mask),
                               torch.tensor([[-LN2, -LN3], [-2 * LN2, -LN3]]))


def test_worked_example_dpo_loss_and_gradients():
    logits, labels, mask = _worked_example()
    logps = sequence_logps(logits, labels, mask)  # [-ln6, -ln12]
    ref = torch.full((2,), -math.log(9), requires_grad=True)
    losses_, metrics = dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], beta=1.0)
    # sigmoid(ln2) = 2 / (2 + 1) = 2/3, so loss = -ln(2/3) = ln(3/2)
    torch.testing.assert_close(losses_, torch.tensor([math.log(1.5)]))
    # rewards: chosen ln(9/6) = ln1.5, rejected ln(9/12) = ln0.75, margin ln2
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor(math.log(1.5)))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor(math.log(0.75)))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor(LN2))
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor(1.0))
    torch.testing.assert_close(metrics["logps/rejected"], torch.tensor(-math.log(12)))

    losses_.sum().backward()
    # dL/dh = -sigmoid(-ln2) = -1/3; h = pc - rc - pr + rr, so ref grads are [+1/3, -1/3]
    torch.testing.assert_close(ref.grad, torch.tensor([1 / 3, -1 / 3]))
    # dL/dlogits[t] = dL/dlogp * (onehot(target) - softmax), with dL/dpc = -1/3, dL/dpr = +1/3
    # chosen  pos 0: -1/3 * ([0,1,0] - [1/4,1/2,1/4]) = [1/12, -1/6, 1/12]
    #         pos 1: -1/3 * ([0,0,1] - [1/3,1/3,1/3]) = [1/9, 1/9, -2/9]
    # rejected pos 0: 1/3 * ([0,0,1] - [1/4,1/2,1/4]) = [-1/12, -1/6, 1/4]
    #          pos 1: 1/3 * ([0,1,0] - [1/3,1/3,1/3]) = [-1/9, 2/9, -1/9]
    # position 2 scores no trained token: 0
    expected = torch.tensor([
        [[1 / 12, -1 / 6, 1 / 12], [1 / 9, 1 / 9, -2 / 9], [0.0, 0.0, 0.0]],
        [[-1 / 12, -1 / 6, 1 / 4], [-1 / 9, 2 / 9, -1 / 9], [0.0, 0.0, 0.0]],
    ])
    torch.testing.assert_close(logits.grad, expected)


def test_worked_example_other_loss_types():
    h = torch.tensor([LN2])  # the worked example's margin, as policy logps with zero reference
    zero = torch.zeros(1)
    def loss(**kw):
        return dpo_loss(h, zero, zero, zero, beta=1.0, **kw)[0]
    # hinge: relu(1 - ln2) = 0.306853
    torch.testing.assert_close(loss(loss_type="hinge"), torch.tensor([1 - LN2]))
    # ipo, beta=1: (ln2 - 1/2)^2 = 0.037287
    torch.testing.assert_close(loss(loss_type="ipo"), torch.tensor([(LN2 - 0.5) ** 2]))
    # cDPO eps=0.1: 0.9 * ln(3/2) + 0.1 * ln3 = 0.364919 + 0.109861 = 0.474780
    torch.testing.assert_close(loss(label_smoothing=0.1),
                               torch.tensor([0.9 * math.log(1.5) + 0.1 * LN3]))
    # robust eps=0.1: (0.9 * ln(3/2) - 0.1 * ln3) / 0.8 = 0.255058 / 0.8 = 0.318822
    torch.testing.assert_close(loss(loss_type="robust", label_smoothing=0.1),
                               torch.tensor([(0.9 * math.log(1.5) - 0.1 * LN3) / 0.8]))


def test_reward_loss_values():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([0.0, 0.0])
    loss, metrics = reward_loss(chosen, rejected)
    # margins [2, 0]: -log sigmoid(2) = ln(1 + e^-2) = 0.126928, -log sigmoid(0) = ln2
    torch.testing.assert_close(loss, torch.tensor((math.log(1 + math.exp(-2)) + LN2) / 2))
    # only the first pair has r_w > r_l (a tie is not a win)
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor(0.5))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor(1.0))


# ----------------------------------------------------------------------------- DPO properties

def _random_logps(B=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(B, generator=g, dtype=dtype)).requires_grad_() for _ in range(4)]


def test_sigmoid_is_log2_when_policy_equals_reference():
    pc, pr, _, _ = _random_logps()
    losses_, metrics = dpo_loss(pc, pr, pc.detach(), pr.detach())
    torch.testing.assert_close(losses_, torch.full((5,), LN2))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor(0.0))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_gradient_formula(beta):
    pc, pr, rc, rr = _random_logps()
    losses_, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses_.sum().backward()
    h = (pc - rc - pr + rr).detach()
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * h))
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-beta * h))


@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_ipo_minimum_at_half_inverse_beta(beta):
    margins = torch.linspace(-10, 10, 20001, dtype=torch.float64)  # step 1e-3
    zeros = torch.zeros_like(margins)
    losses_, _ = dpo_loss(margins, zeros, zeros, zeros, beta=beta, loss_type="ipo")
    assert margins[losses_.argmin()].item() == pytest.approx(1 / (2 * beta), abs=1e-3)


def test_cdpo_and_robust_with_zero_eps_equal_plain_dpo():
    pc, pr, rc, rr = _random_logps()
    beta = 0.1
    plain = -F.logsigmoid(beta * (pc - rc - pr + rr))
    for loss_type in ("sigmoid", "robust"):
        torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, loss_type, 0.0)[0], plain)


def test_robust_is_unbiased_under_label_flips_and_cdpo_is_not():
    # a pair's label is flipped with probability eps: the expected loss over the
    # flip, (1 - eps) L(h) + eps L(-h), is the clean -log sigmoid(beta h) for robust DPO only
    pc, pr, rc, rr = _random_logps(dtype=torch.float64)
    beta, eps = 0.5, 0.2
    clean = -F.logsigmoid(beta * (pc - rc - pr + rr))
    for loss_type, unbiased in (("robust", True), ("sigmoid", False)):
        kept = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)[0]
        flipped = dpo_loss(pr, pc, rr, rc, beta, loss_type, eps)[0]
        expected = (1 - eps) * kept + eps * flipped
        assert torch.allclose(expected, clean) == unbiased


def test_hinge_values():
    h = torch.tensor([-5.0, 0.0, 5.0, 10.0, 20.0])
    zeros = torch.zeros_like(h)
    # beta=0.1: relu(1 - 0.1 h) = [1.5, 1, 0.5, 0, 0]
    losses_, _ = dpo_loss(h, zeros, zeros, zeros, beta=0.1, loss_type="hinge")
    torch.testing.assert_close(losses_, torch.tensor([1.5, 1.0, 0.5, 0.0, 0.0]))


def test_reference_free_ignores_reference():
    pc, pr, rc, rr = _random_logps()
    free, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1, reference_free=True)
    zeros = torch.zeros_like(pc)
    torch.testing.assert_close(free, dpo_loss(pc, pr, zeros, zeros, beta=0.1)[0])
    torch.testing.assert_close(metrics["rewards/chosen"], 0.1 * pc.detach().mean())
    assert not torch.allclose(free, dpo_loss(pc, pr, rc, rr, beta=0.1)[0])


def test_nll_term_hand_worked():
    # chosen log-probs -6 over 3 tokens and -2 over 4 tokens: NLL per token 2 and 0.5
    pc, pr = torch.tensor([-6.0, -2.0], requires_grad=True), torch.tensor([-7.0, -1.0])
    rc, rr = torch.tensor([-6.0, -2.0]), torch.tensor([-7.0, -1.0])  # policy = reference: DPO part is log 2
    tokens = torch.tensor([3.0, 4.0])
    got, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1, nll_weight=0.5, chosen_tokens=tokens)
    torch.testing.assert_close(got, torch.tensor([math.log(2) + 0.5 * 2.0, math.log(2) + 0.5 * 0.5]))
    assert metrics["nll/chosen"].item() == pytest.approx(1.25)
    got.sum().backward()
    # d/d pc of -log sigmoid(0.1 h) at h=0 is -0.05; of 0.5 * (-pc / n) it is -0.5 / n
    torch.testing.assert_close(pc.grad, torch.tensor([-0.05 - 0.5 / 3, -0.05 - 0.5 / 4]))
    plain, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert "nll/chosen" not in m
    torch.testing.assert_close(plain.detach(), torch.full((2,), math.log(2)))
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(pc, pr, rc, rr, nll_weight=1.0)


def test_dpo_rejects_bad_arguments():
    pc, pr, rc, rr = _random_logps()
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)


# ----------------------------------------------------------------------------- masking

def _random_batch(B=3, T=7, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (start, end) in enumerate([(2, 7), (3, 5), (1, 4)][:B]):
        mask[b, start:end] = True
    return logits, labels, mask


def _value_and_grad(logits, labels, mask, **kw):
    logits = logits.clone().requires_grad_()
    value = sequence_logps(logits, labels, mask, **kw)
    (grad,) = torch.autograd.grad((value * torch.arange(1.0, len(value) + 1)).sum(), logits)
    return value, grad


def test_logits_at_masked_positions_change_nothing():
    logits, labels, mask = _random_batch()
    # logits at t matter only if the token at t+1 is trained; the last position never does
    scores_trained = torch.zeros_like(mask)
    scores_trained[:, :-1] = mask[:, 1:]
    noisy = torch.where(scores_trained[..., None], logits, 1e3 * torch.randn_like(logits))
    for average in (False, True):
        v1, g1 = _value_and_grad(logits, labels, mask, average=average)
        v2, g2 = _value_and_grad(noisy, labels, mask, average=average)
        torch.testing.assert_close(v1, v2)
        torch.testing.assert_close(g1, g2)
        assert (g1[~scores_trained] == 0).all()


def test_padding_and_masked_label_values_change_nothing():
    logits, labels, mask = _random_batch()
    B, T, V = logits.shape
    pad = 4
    padded_logits = torch.cat([logits, torch.randn(B, pad, V)], dim=1)
    # padding labels are -100 or far out of the vocabulary: they must never be gathered
    padded_labels = torch.cat([labels, torch.tensor([[-100, 10**6, -100, 7]] * B)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(B, pad, dtype=torch.bool)], dim=1)
    # and masked prompt labels can be anything too
    padded_labels[:, 0] = -100
    v1, g1 = _value_and_grad(logits, labels, mask)
    v2, g2 = _value_and_grad(padded_logits, padded_labels, padded_mask)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2[:, :T])
    assert (g2[:, T:] == 0).all()


# ----------------------------------------------------------------------------- from hidden states

@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_from_hidden_matches_logits_path(impl, average):
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 7, 8, 13
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    _, labels, mask = _random_batch(B, T, V)
    labels[~mask] = -100  # masked labels are arbitrary
    expected = sequence_logps(hidden @ weight.T, labels, mask, average=average)
    got = sequence_logps_from_hidden(hidden, weight, labels, mask, average=average, impl=impl,
                                     chunk_size=3)
    torch.testing.assert_close(got, expected)
    ge = torch.autograd.grad(expected.sum(), (hidden, weight))
    gg = torch.autograd.grad(got.sum(), (hidden, weight))
    for a, b in zip(gg, ge):
        torch.testing.assert_close(a, b)


def test_logprob_impl_errors(monkeypatch):
    hidden, weight, labels = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="unknown logprob impl"):
        token_logps_from_hidden(hidden, weight, labels, impl="fast")
    monkeypatch.setattr(losses, "_triton_available", lambda: False)
    with pytest.raises(ValueError, match="not installed"):
        token_logps_from_hidden(hidden, weight, labels, impl="triton")
    assert losses.resolve_logprob_impl("auto", "cpu") == "chunked"


def test_import_losses_without_triton():
    # triton is optional: block its import and use the default path
    code = ("import sys; sys.modules['triton'] = None; import torch, losses; "
            "h, w = torch.randn(3, 4), torch.randn(5, 4); "
            "print(losses.token_logps_from_hidden(h, w, torch.tensor([0, -100, 4])).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([3])"


# ----------------------------------------------------------------------------- SFT

def test_sft_gradient_accumulation_equals_one_batch():
    logits, labels, mask = _random_batch(B=3, T=7, V=11)  # 5, 2 and 3 trained tokens
    token_mask = mask[:, 1:]
    n_step = int(token_mask.sum())  # 10

    full = logits.clone().requires_grad_()
    loss_full, _ = sft_loss(token_logps(full, labels, mask), token_mask)
    loss_full.backward()

    split = logits.clone().requires_grad_()
    total, micro_means = 0.0, []
    for rows in (slice(0, 2), slice(2, 3)):  # micro-batches of 7 and 3 trained tokens
        tl = token_logps(split[rows], labels[rows], mask[rows])
        loss, metrics = sft_loss(tl, token_mask[rows], num_step_tokens=n_step)
        loss.backward()
        total = total + metrics["loss"]
        micro_means.append(sft_loss(tl.detach(), token_mask[rows])[0])
    torch.testing.assert_close(total, loss_full.detach())
    torch.testing.assert_close(split.grad, full.grad)
    # the naive alternative (mean of micro-batch means) would differ here
    assert not torch.allclose(sum(micro_means) / 2, loss_full.detach())


def test_sft_loss_value_and_shape_check():
    token_lp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    token_mask = torch.tensor([[True, True, False], [True, False, False]])
    # (1 + 2 + 3) / 3 trained tokens = 2
    loss, metrics = sft_loss(token_lp, token_mask)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    assert metrics["tokens"].item() == 3
    with pytest.raises(ValueError, match="loss_mask"):
        sft_loss(token_lp, torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- gradcheck (fp64)

@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2),
                                           ("ipo", 0.0), ("hinge", 0.0)])
def test_gradcheck_dpo(loss_type, eps):
    args = _random_logps(B=4, dtype=torch.float64)
    fn = lambda *a: dpo_loss(*a, beta=0.3, loss_type=loss_type, label_smoothing=eps)[0]
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_reward_sft_and_sequence_logps():
    chosen, rejected = torch.randn(4, dtype=torch.float64, requires_grad=True).split(2)
    assert torch.autograd.gradcheck(lambda c, r: reward_loss(c, r)[0], (chosen.detach().requires_grad_(),
                                                                       rejected.detach().requires_grad_()))
    logits, labels, mask = _random_batch(B=2, T=5, V=4, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sequence_logps(x, labels, mask, average=True), (logits,))
    assert torch.autograd.gradcheck(
        lambda x: sft_loss(token_logps(x, labels, mask), mask[:, 1:], num_step_tokens=7)[0], (logits,))


def test_gradcheck_sequence_logps_from_hidden_chunked():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    _, labels, mask = _random_batch(B=2, T=5, V=6)
    fn = lambda h, w: sequence_logps_from_hidden(h, w, labels, mask, impl="chunked", chunk_size=2)
    assert torch.autograd.gradcheck(fn, (hidden, weight))
