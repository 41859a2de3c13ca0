"""Losses as pure functions of tensors: log-probs of responses, SFT, DPO and its
variants (cDPO, robust DPO, IPO, hinge), and the reward-model loss.

No model, no config, no I/O: every function takes tensors and returns tensors
(and a dict of detached metrics). Conventions, each documented once below:
- next-token shift and response masking: `token_logps`
- sum vs mean of token log-probs: `sequence_logps` (`average`)
- which log-prob implementation (`--logprob-impl`): `token_logps_from_hidden`
- SFT normalisation under gradient accumulation: `sft_loss`
- cDPO vs robust DPO, IPO length normalisation: `dpo_loss`
"""

import importlib.util
import os

import torch
import torch.nn.functional as F

from kernels.logprobs_chunked import (IGNORE_INDEX, acc_dtype, logprobs_from_hidden_chunked,
                                      logprobs_from_hidden_reference)

LOGPROB_IMPLS = ("auto", "naive", "chunked", "triton")
DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


# ----------------------------------------------------------------------------- log-probs

def token_logps(logits, labels, loss_mask):
    """Per-token log-probs of the response tokens, from full logits.

    The shift: the logits at position t score the token at position t+1, so
        token_logps[b, t] = log softmax(logits[b, t])[labels[b, t+1]]   for t < T-1
    i.e. logits[:, :-1] pairs with labels[:, 1:], and the mask that applies is
    loss_mask[:, 1:] (True where the *predicted* token is a trained response
    token). Masked positions give exactly 0 and no gradient; their label values
    (prompt ids, pad ids, even -100) are never used as indices.

    Args:
        logits: [B, T, V] float.
        labels: [B, T] int64, the token ids of the whole sequence (input_ids).
        loss_mask: [B, T] bool, True at response tokens.
    Returns:
        [B, T-1] fp32 (fp64 for fp64 logits), 0 at masked positions.
    """
    mask = loss_mask[:, 1:].bool()
    # masked labels are replaced by 0 so gather never sees an out-of-range id
    targets = torch.where(mask, labels[:, 1:], 0)
    logp = logits[:, :-1].to(acc_dtype(logits.dtype)).log_softmax(-1)  # [B, T-1, V]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return torch.where(mask, picked, 0.0)


def reduce_sequence(token_logps, token_mask, average=False):
    """[B, T-1] -> [B]: sum over the tokens token_mask marks, or their mean.
    (A pair row holds two answers: each has its own mask, data.collate_pairs.)"""
    total = torch.where(token_mask, token_logps, 0.0).sum(-1)
    if not average:
        return total
    return total / token_mask.sum(-1).clamp(min=1)


def sequence_logps(logits, labels, loss_mask, average=False):
    """log pi(response | prompt) for each sequence, from full logits.

        logp[b] = sum_{t : loss_mask[b, t+1]} log pi(labels[b, t+1] | labels[b, :t+1])

    Sum (average=False) is the log-probability of the whole response, which is
    what DPO (Rafailov et al. 2023, eq. 7) uses. average=True divides by the
    number of response tokens (length-normalised; use it for IPO, see
    `dpo_loss`). Shift and mask as in `token_logps`.

    Args: logits [B, T, V], labels [B, T], loss_mask [B, T] bool.
    Returns: [B].
    """
    return reduce_sequence(token_logps(logits, labels, loss_mask), loss_mask[:, 1:].bool(), average)


def _triton_available():
    return importlib.util.find_spec("triton") is not None


def resolve_logprob_impl(impl, device):
    """Turn `--logprob-impl` into one of naive | chunked | triton for `device`.

    auto: triton on CUDA when triton is installed, chunked everywhere else.
    """
    if impl not in LOGPROB_IMPLS:
        raise ValueError(f"unknown logprob impl {impl!r}; choose one of {', '.join(LOGPROB_IMPLS)}")
    device = torch.device(device)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "chunked"
    if impl == "triton":
        if not _triton_available():
            raise ValueError("logprob impl 'triton' needs the triton package, which is not "
                             "installed; pip install triton, or use --logprob-impl chunked")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"logprob impl 'triton' needs a CUDA device (got {device}); on CPU "
                             "set TRITON_INTERPRET=1 before triton is imported (slow, for tests) "
                             "or use --logprob-impl chunked")
    return impl


def token_logps_from_hidden(hidden, weight, labels, impl="auto", chunk_size=None):
    """Label log-probs straight from final hidden states.

        logp[i] = log softmax(hidden[i] @ weight.T)[labels[i]]

    impl (the training scripts' `--logprob-impl`):
      naive   - hidden @ weight.T, log_softmax, gather: builds [N, V] logits.
      chunked - kernels/logprobs_chunked.py: chunks of tokens, logits recomputed
                in backward; the [N, V] logits never exist. CPU and GPU.
      triton  - logits = hidden @ weight.T, then the fused Triton log-softmax +
                gather (kernels/logprobs_triton.py). This does build the [N, V]
                logits (fine on a GPU); the kernel saves the log-softmax buffer.
      auto    - triton on CUDA, chunked elsewhere.

    Args:
        hidden: [N, H] (after the final norm); weight: [V, H] lm_head weight;
        labels: [N] int64, rows equal to -100 give 0 and no gradient.
    Returns:
        [N] fp32 (fp64 for fp64 inputs).
    """
    impl = resolve_logprob_impl(impl, hidden.device)
    if impl == "naive":
        return logprobs_from_hidden_reference(hidden, weight, labels, IGNORE_INDEX)
    if impl == "chunked":
        return logprobs_from_hidden_chunked(hidden, weight, labels, IGNORE_INDEX, chunk_size)
    from kernels.logprobs_triton import logprobs_triton  # imported lazily: triton is optional
    return logprobs_triton(hidden @ weight.T, labels, IGNORE_INDEX)


def response_hidden(hidden, loss_mask):
    """The hidden states that predict the response tokens: hidden[:, t] predicts
    token t + 1, so position t is kept where loss_mask[:, t + 1] is set.

    Args: hidden [B, T, H], loss_mask [B, T] bool.
    Returns: rows [M, H] (row by row, M = trained tokens), mask [B, T-1] bool.
    """
    mask = loss_mask[:, 1:].bool()
    return hidden[:, :-1][mask], mask


def response_token_logps(hidden, weight, labels, loss_mask, impl="auto", chunk_size=None):
    """Per-token log-probs of the response tokens, from hidden states.

    Same shift and mask as `token_logps`, taken by `response_hidden`; only the
    trained positions go through the lm_head, so prompt and padding tokens
    cost nothing.

    Args: hidden [B, T, H], weight [V, H], labels [B, T], loss_mask [B, T] bool.
    Returns: [B, T-1] fp32, 0 at masked positions (what `sft_loss` takes).
    """
    rows, mask = response_hidden(hidden, loss_mask)  # [M, H], [B, T-1]
    picked = token_logps_from_hidden(rows, weight, labels[:, 1:][mask], impl, chunk_size)  # [M]
    # [M] -> [B, T-1]: put each log-prob back at its position, zeros elsewhere
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


def sequence_logps_from_hidden(hidden, weight, labels, loss_mask, average=False, impl="auto",
                               chunk_size=None):
    """`sequence_logps` computed from hidden states without [B, T, V] logits.

    Args: hidden [B, T, H], weight [V, H], labels [B, T], loss_mask [B, T] bool.
    Returns: [B], summed (or averaged, average=True) over response tokens.
    """
    per_token = response_token_logps(hidden, weight, labels, loss_mask, impl, chunk_size)
    return reduce_sequence(per_token, loss_mask[:, 1:].bool(), average)


# ----------------------------------------------------------------------------- SFT

def sft_loss(token_logps, token_mask, num_step_tokens=None):
    """Masked token-level negative log-likelihood (SFT / SIT, and RAFT's update).

        loss = -(1 / N_step) * sum_{b, t : mask} log pi(y_{b,t+1} | y_{b,<=t})

    N_step is the number of trained tokens in the whole optimisation step, i.e.
    across all micro-batches of gradient accumulation. Each micro-batch's loss
    is its summed NLL divided by that same N_step, so summing the micro-batch
    losses (and their gradients) gives exactly the one-big-batch token mean:
    every trained token weighs the same, however the step is split. (A mean of
    per-micro-batch means would over-weight micro-batches with short responses.)

    Args:
        token_logps: [B, T-1] from `token_logps` / `response_token_logps`.
        token_mask: [B, T-1] bool, loss_mask[:, 1:] (aligned with token_logps).
        num_step_tokens: trained tokens in the whole step (int or 0-dim tensor);
            None means this batch is the whole step.
    Returns:
        (loss 0-dim, metrics) with metrics["loss"] this micro-batch's share
        (sum them over the step) and metrics["tokens"] its trained tokens.
    """
    if token_logps.shape != token_mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and token_mask "
                         f"{tuple(token_mask.shape)} must match; pass loss_mask[:, 1:]")
    mask = token_mask.bool()
    tokens = mask.sum()
    if num_step_tokens is None:
        num_step_tokens = tokens.clamp(min=1)
    nll_sum = -torch.where(mask, token_logps, 0.0).sum()
    loss = nll_sum / num_step_tokens
    return loss, {"loss": loss.detach(), "tokens": tokens}


# ----------------------------------------------------------------------------- DPO

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
             nll_weight=0.0, chosen_tokens=None):
    """Preference losses on the implicit-reward margin of a pair.

    With log-ratios against the reference model,
        h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    (reference_free=True: the ref terms are 0, i.e. h = log pi(y_w) - log pi(y_l)),
    the per-pair losses are, with eps = label_smoothing:

    sigmoid (DPO, Rafailov et al. 2023, eq. 7; the paper's choice with beta=0.1)
        -log sigmoid(beta h)
      with eps > 0 it is conservative DPO (cDPO, as in the DPO authors' code):
        -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    robust (rDPO, Chowdhury et al. 2024, "Provably Robust DPO")
        [(1 - eps)(-log sigmoid(beta h)) - eps(-log sigmoid(-beta h))] / (1 - 2 eps)
    ipo (Azar et al. 2024)
        (h - 1 / (2 beta))^2
    hinge (SLiC, Zhao et al. 2023)
        relu(1 - beta h)

    cDPO vs robust, both for labels flipped with probability eps: cDPO mixes the
    two orderings with weights (1-eps, eps), which is a smoothed target; its
    minimiser stops at a finite margin, and its expectation under flips is not
    the clean loss. Robust DPO *subtracts* the flipped term and rescales by
    1/(1-2eps), so its expectation over flipped labels equals the clean DPO
    loss exactly: (1-eps) L(h) + eps L(-h) = -log sigmoid(beta h). Both equal
    plain DPO at eps = 0; robust needs eps < 1/2.

    NLL term (RPO: Pang et al. 2024, "Iterative Reasoning Preference
    Optimization"; TRL's rpo_alpha), added to any of the above when
    nll_weight = alpha > 0:
        + alpha * (-log pi(y_w|x) / |y_w|)
    the chosen answer's negative log-likelihood per token. DPO only asks the
    margin to grow, and often lowers the likelihood of both answers while it
    does; this term keeps the chosen answers likely.

    IPO normalisation: this function does not choose; the log-probs passed in
    do. IPO's target margin 1/(2 beta) is meant on the scale of average
    per-token log-probs (how the IPO authors' setting and common
    implementations use it; summed log-probs of long responses would make the
    target margin vanishingly small in comparison), so callers should pass
    `sequence_logps(..., average=True)` for loss_type="ipo", and summed logps
    (average=False) for the others.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] log pi(y|x) of the policy.
        ref_chosen_logps, ref_rejected_logps: [B] same under the frozen reference
            (ignored when reference_free).
        beta: temperature of the implicit reward beta * log(pi / ref).
        loss_type: sigmoid | robust | ipo | hinge.
        label_smoothing: eps in [0, 1/2), for sigmoid (cDPO) and robust only.
        nll_weight: alpha of the NLL term (0 = none).
        chosen_tokens: [B] answer tokens of each chosen answer, to make its summed
            log-prob per-token (pass ones when the log-probs are already averaged).
    Returns:
        (losses [B], metrics) — average losses over pairs in the caller. Metrics
        (detached 0-dim means): rewards/chosen, rewards/rejected,
        rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    eps = label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
    if eps > 0 and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing applies to loss_type sigmoid (cDPO) or robust, not {loss_type!r}")
    if reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    h = chosen_logratios - rejected_logratios  # [B]

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * h)
    if nll_weight:
        if chosen_tokens is None:
            raise ValueError("nll_weight > 0 needs chosen_tokens (the chosen answers' token counts)")
        chosen_nll = -policy_chosen_logps / chosen_tokens  # [B], per token
        losses = losses + nll_weight * chosen_nll

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    if nll_weight:
        metrics["nll/chosen"] = chosen_nll.detach().mean()
    return losses, metrics


# ----------------------------------------------------------------------------- KL anchor

def top_k_distribution(hidden, weight, k):
    """A model's next-token distributions, kept as their k likeliest tokens.

    Args: hidden [M, H] (after the final norm), weight [V, H] lm_head weight, k.
    Returns: ids [M, k] int64, logps [M, k] fp32 (their log-probs), rest [M]
    fp32 (the log of the probability of all other tokens together).
    """
    logp = _full_logps(hidden, weight)
    top = logp.topk(k, -1)
    return top.indices, top.values, _log_rest(logp, top.indices)


def _full_logps(hidden, weight):
    """[M, H], [V, H] -> [M, V] fp32 log-probs over the whole vocabulary (the KL
    needs every token; a few anchor answers per step keep this small)."""
    return torch.log_softmax(hidden.float() @ weight.float().T, -1)


def _log_rest(logp, ids):
    """log of the probability of every token but `ids`: [M, V], [M, k] -> [M]. The
    excluded tokens get -1e30 rather than -inf, so that with no token left the
    result is about -1e30 (probability 0) and its gradient stays finite."""
    return logp.scatter(-1, ids, -1e30).logsumexp(-1)


def top_k_kl(hidden, weight, ref_ids, ref_logps, ref_rest):
    """KL(ref || pi) per position, with the vocabulary split into the
    reference's k likeliest tokens and one bucket for all the others:

        KL = sum_{i in top k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

    p = the reference, q = the policy (from `hidden`), p_rest = 1 - sum_top p_i.
    Merging tokens can only lose divergence, so this is a lower bound of the
    full KL, equal to it when the reference puts all its mass on its k tokens.
    It is the forward KL (the reference's view): the policy is pushed to keep
    every answer the reference finds likely, not only its single best one.

    Args: hidden [M, H], weight [V, H], and the reference's `top_k_distribution`
    at the same M positions. Returns: [M] fp32.
    """
    logq = _full_logps(hidden, weight)
    logq_top = logq.gather(-1, ref_ids)  # [M, k]
    logq_rest = _log_rest(logq, ref_ids)  # [M]
    return (ref_logps.exp() * (ref_logps - logq_top)).sum(-1) + ref_rest.exp() * (ref_rest - logq_rest)


# ----------------------------------------------------------------------------- reward model

def reward_loss(chosen_rewards, rejected_rewards):
    """Bradley-Terry loss of a scalar reward model on preference pairs.

        loss = mean_b -log sigmoid(r(x, y_w) - r(x, y_l))

    Args: chosen_rewards, rejected_rewards: [B] scalar rewards.
    Returns: (loss 0-dim, metrics) with loss, rewards/chosen, rewards/rejected,
        rewards/margins (mean r_w - r_l) and rewards/accuracies (share r_w > r_l).
    """
    margins = chosen_rewards - rejected_rewards  # [B]
    loss = -F.logsigmoid(margins).mean()
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": margins.detach().mean(),
        "rewards/accuracies": (margins.detach() > 0).float().mean(),
    }
    return loss, metrics
