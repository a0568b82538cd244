"""Preference losses as pure tensor functions — the same numbers as TRL 1.16.

Inputs are token-SUMMED completion log-probs (never length-averaged; LD-DPO weighting is
applied upstream in `rayalign.models.logprobs`). Every DPO variant is one function of the
log-ratios, listed once in `LOSS_FUNCTIONS`. Rewards are always beta * (policy - reference),
detached, whatever the loss type. See docs/losses.md for the formulas and TRL differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


@dataclass(frozen=True)
class PairTerms:
    """What a per-pair loss may read, computed once per batch."""

    chosen_logratios: torch.Tensor  # h_c = pi_c - rho_c
    rejected_logratios: torch.Tensor  # h_r
    chosen_scores: torch.Tensor  # u_c = g(h_c), the f-divergence score
    rejected_scores: torch.Tensor  # u_r
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    beta: float
    label_smoothing: float
    discopop_tau: float

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores


def _lengths(t: PairTerms, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    if t.chosen_lengths is None or t.rejected_lengths is None:
        raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths "
                         "(completion token counts)")
    return (t.chosen_lengths.to(t.chosen_scores.dtype).clamp(min=1.0),
            t.rejected_lengths.to(t.rejected_scores.dtype).clamp(min=1.0))


def _sigmoid(t: PairTerms) -> torch.Tensor:
    return -F.logsigmoid(t.beta * t.delta)


def _hinge(t: PairTerms) -> torch.Tensor:
    return torch.relu(1 - t.beta * t.delta)


def _ipo(t: PairTerms) -> torch.Tensor:
    n_c, n_r = _lengths(t, "ipo")
    # beta plays the role of tau in the IPO paper; scores are length-normalised.
    return (t.chosen_scores / n_c - t.rejected_scores / n_r - 1 / (2 * t.beta)) ** 2


def _exo_pair(t: PairTerms) -> torch.Tensor:
    eps = t.label_smoothing
    if eps <= 0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing > 0")
    # TRL builds epsilon as a float32 tensor and takes log1p(-eps) and log(eps) of it, so
    # both are float32-rounded constants even when the log-probs are float64.
    eps32 = torch.tensor(eps, dtype=torch.float32)
    log_1m_eps = float(torch.log1p(-eps32))
    log_eps = float(torch.log(eps32))
    z = t.beta * t.delta
    return torch.sigmoid(z) * (F.logsigmoid(z) - log_1m_eps) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_eps)


def _nca_pair(t: PairTerms) -> torch.Tensor:
    c = t.beta * t.chosen_logratios
    r = t.beta * t.rejected_logratios
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _robust(t: PairTerms) -> torch.Tensor:
    eps = t.label_smoothing
    z = t.beta * t.delta
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(t: PairTerms) -> torch.Tensor:
    # TRL 1.16's bco_pair is stateless (no running mean of rewards).
    return -F.logsigmoid(t.beta * t.chosen_logratios) - F.logsigmoid(-t.beta * t.rejected_logratios)


def _sppo_hard(t: PairTerms) -> torch.Tensor:
    return (t.chosen_logratios - 0.5 / t.beta) ** 2 + (t.rejected_logratios + 0.5 / t.beta) ** 2


def _aot_form(d: torch.Tensor, t: PairTerms) -> torch.Tensor:
    eps = t.label_smoothing
    return -(1 - eps) * F.logsigmoid(t.beta * d) - eps * F.logsigmoid(-t.beta * d)


def _aot(t: PairTerms) -> torch.Tensor:
    # Batch-coupled: index k is a sort rank, not pair k.
    pi = torch.sort(t.policy_chosen_logps - t.policy_rejected_logps, dim=0).values
    ref = torch.sort(t.ref_chosen_logps - t.ref_rejected_logps, dim=0).values
    return _aot_form(pi - ref, t)


def _aot_unpaired(t: PairTerms) -> torch.Tensor:
    c = torch.sort(t.chosen_logratios, dim=0).values
    r = torch.sort(t.rejected_logratios, dim=0).values
    return _aot_form(c - r, t)


def _apo_zero(t: PairTerms) -> torch.Tensor:
    return (1 - torch.sigmoid(t.beta * t.chosen_logratios)) + torch.sigmoid(t.beta * t.rejected_logratios)


def _apo_down(t: PairTerms) -> torch.Tensor:
    return torch.sigmoid(t.beta * t.chosen_logratios) + (
        1 - torch.sigmoid(t.beta * (t.chosen_logratios - t.rejected_logratios)))


def _discopop(t: PairTerms) -> torch.Tensor:
    z = t.beta * t.delta
    mix = torch.sigmoid(z / t.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _sft(t: PairTerms) -> torch.Tensor:
    # Batch-level mean NLL of all chosen tokens, the same value for every pair.
    _lengths(t, "sft")  # raises a clear error when the token counts are missing
    value = -t.policy_chosen_logps.sum() / t.chosen_lengths.to(t.policy_chosen_logps.dtype).sum().clamp(min=1.0)
    return value.expand(t.policy_chosen_logps.shape[0]).clone()


def _sigmoid_norm(t: PairTerms) -> torch.Tensor:
    n_c, n_r = _lengths(t, "sigmoid_norm")
    return -F.logsigmoid(t.beta * (t.chosen_scores / n_c - t.rejected_scores / n_r))


LOSS_FUNCTIONS: dict[str, Callable[[PairTerms], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": _sigmoid_norm,
}


def f_divergence_score(h: torch.Tensor, f_divergence_type: str, alpha_coef: float) -> torch.Tensor:
    """g(h) of spec §2: the score each f-divergence assigns a log-ratio."""
    if f_divergence_type == "reverse_kl":
        return h
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-h)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(h)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha_coef - 1.0) < 1e-6:
            return h
        # TRL evaluates the exponential in float32 with an overflow clamp (80; 11 for fp16)
        # and multiplies by the reciprocal. float64 inputs run the same float32 path (TRL
        # raises on them; we do not).
        limit = 11.0 if h.dtype == torch.float16 else 80.0
        value = torch.exp(torch.clamp((alpha_coef - 1.0) * h.float(), max=limit)) - 1
        return value.to(h.dtype) * (1.0 / (alpha_coef - 1.0))
    raise ValueError(f"f_divergence_type={f_divergence_type!r}; allowed: reverse_kl, forward_kl, "
                     "js_divergence, alpha_divergence")


def _terms(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
           beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau,
           chosen_lengths, rejected_lengths) -> PairTerms:
    h_c = policy_chosen_logps - ref_chosen_logps
    h_r = policy_rejected_logps - ref_rejected_logps
    return PairTerms(
        chosen_logratios=h_c, rejected_logratios=h_r,
        chosen_scores=f_divergence_score(h_c, f_divergence_type, f_alpha_divergence_coef),
        rejected_scores=f_divergence_score(h_r, f_divergence_type, f_alpha_divergence_coef),
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
        beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau)


def _check_loss_type(loss_type: str, f_divergence_type: str) -> None:
    if loss_type not in LOSS_FUNCTIONS:
        raise ValueError(f"loss_type={loss_type!r}; allowed: {', '.join(LOSS_FUNCTIONS)}")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSSES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} works only with loss types "
                         f"{F_DIVERGENCE_LOSSES}, not {loss_type!r}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 1.0,
             discopop_tau: float = 0.05, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and rewards for one loss type, as TRL 1.16 computes them.

    All log-prob tensors are (B,) token-summed completion log-probs. `chosen_lengths` /
    `rejected_lengths` (completion token counts) are needed by ipo, sigmoid_norm and sft
    (sft's value is -sum(policy_chosen_logps) / sum(chosen_lengths), broadcast to (B,)).
    Returns (losses, chosen_rewards, rejected_rewards); rewards are beta*(policy-ref), detached.
    """
    _check_loss_type(loss_type, f_divergence_type)
    t = _terms(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
               f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
               chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    losses = LOSS_FUNCTIONS[loss_type](t)
    return losses, (beta * t.chosen_logratios).detach(), (beta * t.rejected_logratios).detach()


def dpo_objective(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                  ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                  loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
                  beta: float = 0.1, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                  f_alpha_divergence_coef: float = 1.0, discopop_tau: float = 0.05,
                  chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
                  chosen_weights: torch.Tensor | None = None, rejected_weights: torch.Tensor | None = None,
                  reference_free: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's total DPO loss, sum_k w_k * mean_i l_{k,i}, plus its logged metrics.

    `chosen_weights`/`rejected_weights` are WPO sequence weights (see `wpo_weights`); each
    loss's per-pair values are multiplied by w_c * w_r (no gradient through the weights).
    `reference_free` takes the reference log-probs as 0.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    if reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    pair_weight = None
    if chosen_weights is not None or rejected_weights is not None:
        bad = [t for t in types if t in ("aot", "aot_unpaired")]
        if bad:
            raise ValueError(f"use_weighting (WPO) is not supported with loss types {bad}")
        pair_weight = (chosen_weights * rejected_weights).detach()
    total = policy_chosen_logps.new_zeros(())
    chosen_rewards = rejected_rewards = None
    for name, w in zip(types, weights):
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            loss_type=name, beta=beta, label_smoothing=label_smoothing,
            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        if pair_weight is not None:
            losses = losses * pair_weight.to(losses.dtype)
        total = total + w * losses.mean()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }
    return total, metrics


def online_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                    beta: float, loss_type: str = "sigmoid") -> torch.Tensor:
    """TRL 1.16 OnlineDPOTrainer's per-pair loss: sigmoid, or IPO on the summed log-ratios
    ((logits - 1/(2 beta))^2, no length normalisation, unlike the offline IPO)."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"online DPO loss_type={loss_type!r}: expected sigmoid or ipo")


@torch.no_grad()
def wpo_weights(per_token_logps: torch.Tensor, per_token_log_sum_sq_probs: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """WPO sequence weights exp(sum_t (log p_t - log sum_v p_v^2) / n), no gradient."""
    mask = mask.to(per_token_logps.dtype)
    n = mask.sum(dim=-1).clamp_min(1)
    return torch.exp(((per_token_logps - per_token_log_sum_sq_probs) * mask).sum(dim=-1) / n)


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Bradley–Terry loss of TRL's RewardTrainer, with optional margin and centring."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


@torch.no_grad()
def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """RewardTrainer's logged metrics for a batch."""
    all_rewards = torch.cat([chosen_rewards, rejected_rewards])
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "min_reward": all_rewards.min(),
        "mean_reward": all_rewards.mean(),
        "max_reward": all_rewards.max(),
    }


def sft_loss(per_token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all completion tokens of the batch (token-level mean)."""
    mask = mask.to(per_token_logps.dtype)
    return -(per_token_logps * mask).sum() / mask.sum().clamp(min=1.0)
