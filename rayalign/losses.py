"""Preference losses as pure tensor functions — the same numbers as TRL 1.16.

Inputs are token-SUMMED completion log-probs (never length-averaged; LD-DPO weighting is
applied upstream in `rayalign.models.logprobs`). Every DPO variant is one function of the
log-ratios plus one `LossSpec` entry in `LOSSES`, whose metadata `DPOConfig` validates
against. Hyperparameters travel as one `LossParams`. Rewards are always
beta * (policy - reference), detached, whatever the loss type. See docs/losses.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossParams:
    """The hyperparameters DPO losses read, with TRL 1.16 DPOConfig's defaults.

    These defaults are the only ones: `DPOConfig` declares the same fields (TRL's flat
    names) with `LossParams.<field>` as default, and `LossParams.of(cfg)` reads them back.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0  # read by exo_pair, robust, aot, aot_unpaired
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05

    @classmethod
    def of(cls, cfg: object) -> "LossParams":
        """The params named by this class's fields, read off any object carrying them (a DPOConfig)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class PairTerms:
    """The tensors a per-pair loss may read, computed once per batch."""

    chosen_logratios: torch.Tensor  # h_c = pi_c - rho_c
    rejected_logratios: torch.Tensor  # h_r
    chosen_scores: torch.Tensor  # u_c = g(h_c), the f-divergence score
    rejected_scores: torch.Tensor  # u_r
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor | None  # completion token counts; present when the spec needs_lengths
    rejected_lengths: torch.Tensor | None

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token counts as the scores' dtype, at least 1."""
        return (self.chosen_lengths.to(self.chosen_scores.dtype).clamp(min=1.0),
                self.rejected_lengths.to(self.rejected_scores.dtype).clamp(min=1.0))


@dataclass(frozen=True)
class Requirement:
    """A bound a loss type puts on one `LossParams` field; `DPOConfig` and the loss
    functions both check it, and the error names the field."""

    field: str
    holds: Callable[[float], bool]
    text: str  # the bound as the error states it, e.g. "label_smoothing > 0"


@dataclass(frozen=True)
class LossSpec:
    """One DPO loss type: its per-pair function and what callers must know about it.

    `supports_f_divergence`: the function reads only the f-divergence scores (not the raw
    log-ratios), so any `f_divergence_type` applies (TRL's list). `needs_lengths`: it
    reads completion token counts. `batch_coupled`: position i of its result is a sort
    rank, not pair i, so per-pair WPO weights (`use_weighting`) cannot apply.
    """

    fn: Callable[[PairTerms, LossParams], torch.Tensor]
    supports_f_divergence: bool = False
    needs_lengths: bool = False
    batch_coupled: bool = False
    requires: tuple[Requirement, ...] = ()


def _sigmoid(t: PairTerms, p: LossParams) -> torch.Tensor:
    return -F.logsigmoid(p.beta * t.delta)


def _hinge(t: PairTerms, p: LossParams) -> torch.Tensor:
    return torch.relu(1 - p.beta * t.delta)


def _ipo(t: PairTerms, p: LossParams) -> torch.Tensor:
    n_c, n_r = t.lengths()
    # beta plays the role of tau in the IPO paper; scores are length-normalised.
    return (t.chosen_scores / n_c - t.rejected_scores / n_r - 1 / (2 * p.beta)) ** 2


def _exo_pair(t: PairTerms, p: LossParams) -> torch.Tensor:
    # TRL builds epsilon as a float32 tensor and takes log1p(-eps) and log(eps) of it, so
    # both are float32-rounded constants even when the log-probs are float64.
    eps32 = torch.tensor(p.label_smoothing, dtype=torch.float32)
    log_1m_eps = float(torch.log1p(-eps32))
    log_eps = float(torch.log(eps32))
    z = p.beta * t.delta
    return torch.sigmoid(z) * (F.logsigmoid(z) - log_1m_eps) + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_eps)


def _nca_pair(t: PairTerms, p: LossParams) -> torch.Tensor:
    c = p.beta * t.chosen_logratios
    r = p.beta * t.rejected_logratios
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _robust(t: PairTerms, p: LossParams) -> torch.Tensor:
    eps = p.label_smoothing
    z = p.beta * t.delta
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(t: PairTerms, p: LossParams) -> torch.Tensor:
    # TRL 1.16's bco_pair is stateless (no running mean of rewards).
    return -F.logsigmoid(p.beta * t.chosen_logratios) - F.logsigmoid(-p.beta * t.rejected_logratios)


def _sppo_hard(t: PairTerms, p: LossParams) -> torch.Tensor:
    return (t.chosen_logratios - 0.5 / p.beta) ** 2 + (t.rejected_logratios + 0.5 / p.beta) ** 2


def _aot_form(d: torch.Tensor, p: LossParams) -> torch.Tensor:
    eps = p.label_smoothing
    return -(1 - eps) * F.logsigmoid(p.beta * d) - eps * F.logsigmoid(-p.beta * d)


def _aot(t: PairTerms, p: LossParams) -> torch.Tensor:
    # Batch-coupled: index k is a sort rank, not pair k.
    pi = torch.sort(t.policy_chosen_logps - t.policy_rejected_logps, dim=0).values
    ref = torch.sort(t.ref_chosen_logps - t.ref_rejected_logps, dim=0).values
    return _aot_form(pi - ref, p)


def _aot_unpaired(t: PairTerms, p: LossParams) -> torch.Tensor:
    c = torch.sort(t.chosen_logratios, dim=0).values
    r = torch.sort(t.rejected_logratios, dim=0).values
    return _aot_form(c - r, p)


def _apo_zero(t: PairTerms, p: LossParams) -> torch.Tensor:
    return (1 - torch.sigmoid(p.beta * t.chosen_logratios)) + torch.sigmoid(p.beta * t.rejected_logratios)


def _apo_down(t: PairTerms, p: LossParams) -> torch.Tensor:
    return torch.sigmoid(p.beta * t.chosen_logratios) + (
        1 - torch.sigmoid(p.beta * (t.chosen_logratios - t.rejected_logratios)))


def _discopop(t: PairTerms, p: LossParams) -> torch.Tensor:
    z = p.beta * t.delta
    mix = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _sft(t: PairTerms, p: LossParams) -> torch.Tensor:
    # Batch-level mean NLL of all chosen tokens, the same value for every pair.
    value = -t.policy_chosen_logps.sum() / t.chosen_lengths.to(t.policy_chosen_logps.dtype).sum().clamp(min=1.0)
    return value.expand(t.policy_chosen_logps.shape[0]).clone()


def _sigmoid_norm(t: PairTerms, p: LossParams) -> torch.Tensor:
    n_c, n_r = t.lengths()
    return -F.logsigmoid(p.beta * (t.chosen_scores / n_c - t.rejected_scores / n_r))


_SMOOTHING_ABOVE_0 = Requirement("label_smoothing", lambda eps: eps > 0, "label_smoothing > 0")
_SMOOTHING_BELOW_HALF = Requirement("label_smoothing", lambda eps: eps < 0.5, "label_smoothing < 0.5")

# TRL 1.16's loss types, in the order of its DPOConfig help text.
LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_sigmoid, supports_f_divergence=True),
    "hinge": LossSpec(_hinge, supports_f_divergence=True),
    "ipo": LossSpec(_ipo, supports_f_divergence=True, needs_lengths=True),
    "exo_pair": LossSpec(_exo_pair, supports_f_divergence=True, requires=(_SMOOTHING_ABOVE_0,)),
    "nca_pair": LossSpec(_nca_pair),
    "robust": LossSpec(_robust, supports_f_divergence=True, requires=(_SMOOTHING_BELOW_HALF,)),
    "bco_pair": LossSpec(_bco_pair),
    "sppo_hard": LossSpec(_sppo_hard),
    "aot": LossSpec(_aot, batch_coupled=True),
    "aot_unpaired": LossSpec(_aot_unpaired, batch_coupled=True),
    "apo_zero": LossSpec(_apo_zero),
    "apo_down": LossSpec(_apo_down),
    "discopop": LossSpec(_discopop, supports_f_divergence=True),
    "sft": LossSpec(_sft, supports_f_divergence=True, needs_lengths=True),
    "sigmoid_norm": LossSpec(_sigmoid_norm, supports_f_divergence=True, needs_lengths=True),
}


def _alpha_divergence(h: torch.Tensor, alpha_coef: float) -> torch.Tensor:
    if abs(alpha_coef - 1.0) < 1e-6:
        return h
    # TRL evaluates the exponential in float32 with an overflow clamp (80; 11 for fp16)
    # and multiplies by the reciprocal. float64 inputs run the same float32 path (TRL
    # raises on them; we do not).
    limit = 11.0 if h.dtype == torch.float16 else 80.0
    value = torch.exp(torch.clamp((alpha_coef - 1.0) * h.float(), max=limit)) - 1
    return value.to(h.dtype) * (1.0 / (alpha_coef - 1.0))


# g(h) of spec §2: the score each f-divergence assigns a log-ratio (second argument:
# f_alpha_divergence_coef).
F_DIVERGENCES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "reverse_kl": lambda h, a: h,
    "forward_kl": lambda h, a: 1 - torch.exp(-h),
    "js_divergence": lambda h, a: math.log(2.0) + F.logsigmoid(h),
    "alpha_divergence": _alpha_divergence,
}


def f_divergence_score(h: torch.Tensor, f_divergence_type: str, alpha_coef: float) -> torch.Tensor:
    """g(h) of spec §2: the score each f-divergence assigns a log-ratio."""
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r}; allowed: {', '.join(F_DIVERGENCES)}")
    return F_DIVERGENCES[f_divergence_type](h, alpha_coef)


def loss_type_errors(loss_types: Sequence[str], params: LossParams, *, weighted: bool = False) -> list[str]:
    """Why these loss types cannot run with `params` (and WPO weights when `weighted`),
    each message starting with the field to change; empty when they can. The one place
    the table's metadata is enforced: `DPOConfig` raises the first as a ConfigError,
    `combined_dpo_loss` as a ValueError."""
    def field(i: int) -> str:
        return f"loss_type[{i}]" if len(loss_types) > 1 else "loss_type"

    unknown = [f"{field(i)}: got {name!r}; allowed: {', '.join(map(repr, LOSSES))}"
               for i, name in enumerate(loss_types) if name not in LOSSES]
    if unknown:
        return unknown
    specs = {name: LOSSES[name] for name in loss_types}
    errors = [f"{req.field}: {name} needs {req.text}"
              for name, spec in specs.items() for req in spec.requires
              if not req.holds(getattr(params, req.field))]
    if params.f_divergence_type not in F_DIVERGENCES:
        errors.append(f"f_divergence_type: got {params.f_divergence_type!r}; allowed: "
                      f"{', '.join(map(repr, F_DIVERGENCES))}")
    elif params.f_divergence_type != "reverse_kl":
        bad = [name for name, spec in specs.items() if not spec.supports_f_divergence]
        if bad:
            allowed = tuple(name for name, spec in LOSSES.items() if spec.supports_f_divergence)
            errors.append(f"f_divergence_type: {params.f_divergence_type} works only with loss types "
                          f"{allowed}; got {bad}")
    if weighted:
        bad = [name for name, spec in specs.items() if spec.batch_coupled]
        if bad:
            errors.append(f"use_weighting: not supported with loss types {bad}")
    return errors


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             loss_type: str = "sigmoid", params: LossParams = LossParams(),
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and rewards for one loss type, as TRL 1.16 computes them.

    All log-prob tensors are (B,) token-summed completion log-probs. `chosen_lengths` /
    `rejected_lengths` (completion token counts) are needed by the types whose spec
    `needs_lengths` (ipo, sigmoid_norm, sft; sft's value is
    -sum(policy_chosen_logps) / sum(chosen_lengths), broadcast to (B,)).
    Returns (losses, chosen_rewards, rejected_rewards); rewards are beta*(policy-ref), detached.
    """
    errors = loss_type_errors([loss_type], params)
    if errors:
        raise ValueError(errors[0])
    spec = LOSSES[loss_type]
    if spec.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths "
                         "(completion token counts)")
    h_c = policy_chosen_logps - ref_chosen_logps
    h_r = policy_rejected_logps - ref_rejected_logps
    t = PairTerms(
        chosen_logratios=h_c, rejected_logratios=h_r,
        chosen_scores=f_divergence_score(h_c, params.f_divergence_type, params.f_alpha_divergence_coef),
        rejected_scores=f_divergence_score(h_r, params.f_divergence_type, params.f_alpha_divergence_coef),
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    losses = spec.fn(t, params)
    return losses, (params.beta * h_c).detach(), (params.beta * h_r).detach()


def combined_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                      ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                      loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
                      params: LossParams = LossParams(),
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
    weighted = chosen_weights is not None or rejected_weights is not None
    errors = loss_type_errors(types, params, weighted=weighted)
    if errors:
        raise ValueError(errors[0])
    if reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    pair_weight = (chosen_weights * rejected_weights).detach() if weighted else None
    total = policy_chosen_logps.new_zeros(())
    chosen_rewards = rejected_rewards = None
    for name, w in zip(types, weights):
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
            loss_type=name, params=params, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
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
