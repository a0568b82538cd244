"""What a learner optimises: one `Objective` per job, picked by config type (`for_config`).

An objective says which model head it trains, how rows become a micro-batch (and the
per-micro-batch inputs of its loss), whether the batch needs reference log-probs, and the
loss with its TRL-named metrics. The loss functions below glue the pure pieces together —
log-probs (`rayalign.models.logprobs`) and losses (`rayalign.losses`). No Ray, no
DeepSpeed: `model` is anything callable like a Hugging Face model (a DeepSpeed engine
included). The learner (`rayalign.actors.learner`) keeps one accumulation loop for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rayalign import losses
from rayalign.batch import PreferenceBatch, SequenceBatch
from rayalign.config import DPOConfig, OnlineDPOConfig, RewardConfig, SFTConfig, TrainConfig
from rayalign.models.logprobs import preference_logprobs, sequence_scores, sft_logprobs


# A metric that is a token count: summed over micro-batches and learners and accumulated over
# the run by the learner, not averaged like the others (TRL's running `num_tokens`).
NUM_TOKENS = "num_tokens"

# Returns the reference log-probs (chosen, rejected) of a batch once they are needed.
ReferenceFn = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Pooled:
    """A metric TRL pools across processes: one micro-batch's sum and count (its token-weighted
    means: entropy, mean_token_accuracy, logits/*). The learner adds both up over the learners
    for each micro-batch before dividing, as TRL's gathers do, and logs the mean of those ratios
    over the micro-batches; on its own it is total / count, 0 without tokens (TRL's rule)."""

    total: torch.Tensor
    count: torch.Tensor

    def __float__(self) -> float:
        count = float(self.count)
        return float(self.total) / count if count > 0 else 0.0


def dpo_objective(model, batch: PreferenceBatch, cfg: DPOConfig, reference: ReferenceFn | None = None,
                  ) -> tuple[torch.Tensor, dict]:
    """DPO loss and TRL-named metrics; reference log-probs must already be on `batch`
    (precomputed columns, or the implicit adapter-off pass) unless the run is reference-free,
    or `reference` returns them after the policy's forward (a reference actor computes them
    meanwhile)."""
    out = preference_logprobs(model, batch, ld_alpha=cfg.ld_alpha, use_weighting=cfg.use_weighting,
                              padding_free=cfg.padding_free)
    if reference is not None:
        batch = batch.with_reference(*reference())
    if cfg.reference_mode == "none":
        ref_c = torch.zeros_like(out.chosen_logps)
        ref_r = torch.zeros_like(out.rejected_logps)
    else:
        if batch.ref_chosen_logps is None:
            raise RuntimeError("dpo_objective: batch has no reference log-probs")
        ref_c = batch.ref_chosen_logps.to(out.chosen_logps)
        ref_r = batch.ref_rejected_logps.to(out.rejected_logps)
    loss, metrics = losses.combined_dpo_loss(
        out.chosen_logps, out.rejected_logps, ref_c, ref_r,
        loss_type=cfg.loss_type, loss_weights=cfg.loss_weights, params=losses.LossParams.of(cfg),
        chosen_lengths=out.chosen_lengths, rejected_lengths=out.rejected_lengths,
        chosen_weights=out.chosen_weights, rejected_weights=out.rejected_weights,
    )
    metrics = dict(metrics)
    c_tokens, r_tokens = out.chosen_lengths.sum(), out.rejected_lengths.sum()
    metrics["logits/chosen"] = Pooled(out.chosen_logits_sum.detach(), c_tokens)
    metrics["logits/rejected"] = Pooled(out.rejected_logits_sum.detach(), r_tokens)
    metrics["entropy"] = Pooled(out.entropy_sum, c_tokens + r_tokens)
    metrics["mean_token_accuracy"] = Pooled(out.chosen_top1_sum, c_tokens)
    metrics[NUM_TOKENS] = batch_tokens(batch)
    metrics["loss"] = loss.detach()
    return loss, metrics


def batch_tokens(batch: PreferenceBatch | SequenceBatch) -> torch.Tensor:
    """Attention-mask tokens of a micro-batch, prompt tokens included (twice in a preference
    batch: in the chosen and in the rejected row): what TRL adds to its running `num_tokens`.
    The learner sums it over micro-batches and learners into the run's total (`NUM_TOKENS`)."""
    return batch.attention_mask.sum().float()


@torch.no_grad()
def reference_logprobs(model, batch: PreferenceBatch, cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed reference log-probs of chosen and rejected (same weighting as the policy)."""
    out = preference_logprobs(model, batch, ld_alpha=getattr(cfg, "ld_alpha", None), use_weighting=False,
                              padding_free=cfg.padding_free, token_stats=False)
    return out.chosen_logps.detach().float().cpu(), out.rejected_logps.detach().float().cpu()


def online_dpo_objective(model, batch: PreferenceBatch, cfg, beta: float,
                         scores: tuple[torch.Tensor, torch.Tensor] | None = None,
                         reference: ReferenceFn | None = None,
                         ) -> tuple[torch.Tensor, dict]:
    """Online DPO on sampled pairs with TRL 1.16 OnlineDPOTrainer's metric names.

    `scores` (chosen, rejected) are the rewards that ranked the pair (None with a judge).
    `reference`, when given, returns the reference log-probs after the policy's forward
    (a reference actor computes them meanwhile). KL terms are over completion tokens:
    kl_i = log pi(y_i) - log ref(y_i) summed.
    """
    out = preference_logprobs(model, batch, padding_free=cfg.padding_free, token_stats=False)  # TRL logs none
    if reference is not None:
        batch = batch.with_reference(*reference())
    policy_c, policy_r = out.chosen_logps, out.rejected_logps
    if cfg.reference_mode == "none":
        ref_c, ref_r = torch.zeros_like(policy_c), torch.zeros_like(policy_r)
    else:
        if batch.ref_chosen_logps is None:
            raise RuntimeError("online_dpo_objective: batch has no reference log-probs")
        ref_c, ref_r = batch.ref_chosen_logps.to(policy_c), batch.ref_rejected_logps.to(policy_r)
    loss = losses.online_dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=beta, loss_type=cfg.loss_type).mean()
    with torch.no_grad():
        logps = torch.cat([policy_c, policy_r]).detach()
        kl = logps - torch.cat([ref_c, ref_r])
        non_score = -beta * kl
        chosen_rewards = beta * (policy_c.detach() - ref_c)
        rejected_rewards = beta * (policy_r.detach() - ref_r)
        metrics = {
            "loss": loss.detach(),
            "objective/kl": kl.mean(),
            "objective/entropy": -logps.mean(),
            "objective/non_score_reward": non_score.mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy_c.detach().mean(),
            "logps/rejected": policy_r.detach().mean(),
            "beta": torch.tensor(beta),
        }
        if scores is not None:
            all_scores = torch.cat([scores[0], scores[1]]).to(kl)
            metrics["objective/rlhf_reward"] = (all_scores + non_score).mean()
    return loss, metrics


def sft_objective(model, batch: SequenceBatch, cfg) -> tuple[torch.Tensor, dict]:
    """Mean NLL over completion tokens (TRL SFTTrainer's completion-only loss), with TRL's
    entropy and mean_token_accuracy (first-argmax hits) over the same tokens."""
    out = sft_logprobs(model, batch, padding_free=cfg.padding_free)
    mask = batch.completion_mask.to(out.per_token_logps.device).clone()  # per-token logps are unshifted:
    mask[:, 0] = 0  # a row's first token is never predicted (TRL's labels[:, 1:]), even if it is a completion's
    loss = losses.sft_loss(out.per_token_logps, mask)
    tokens = out.num_tokens.sum()  # the same tokens: TRL's label mask
    return loss, {"loss": loss.detach(), "entropy": Pooled(out.entropy.sum(), tokens),
                  "mean_token_accuracy": Pooled(out.is_top1.sum(), tokens), NUM_TOKENS: batch_tokens(batch)}


def reward_objective(model, batch: PreferenceBatch, cfg: RewardConfig) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry loss on the scalar head, chosen half vs rejected half."""
    logits = sequence_scores(model, batch.input_ids, batch.attention_mask,
                             padding_free=cfg.padding_free).squeeze(-1)
    b = len(batch)
    chosen, rejected = logits[:b], logits[b:]
    margin = None if batch.margin is None else batch.margin.to(chosen)
    loss = losses.reward_loss(chosen, rejected, margin=margin,
                              center_rewards_coefficient=cfg.center_rewards_coefficient)
    metrics = {k: torch.as_tensor(v).detach().float() for k, v in losses.reward_metrics(chosen.detach(), rejected.detach()).items()}
    metrics[NUM_TOKENS] = batch_tokens(batch)
    metrics["loss"] = loss.detach()
    return loss, metrics


# ----------------------------------------------------------------------------- objectives


class Objective:
    """One job's learner step, as the learner's accumulation loop uses it."""

    model_type = "causal_lm"  # or "reward": a sequence-classification head with one score
    batch_type: type = PreferenceBatch

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @property
    def reference_mode(self) -> str | None:
        """How reference log-probs reach a batch (`DPOConfig.reference_mode`); None: unused."""
        return None

    def collate(self, rows, pad_token_id: int) -> tuple[PreferenceBatch | SequenceBatch, dict]:
        """(micro-batch, per-micro-batch inputs of `loss`) from tokenized rows."""
        batch = self.batch_type.from_rows(rows, pad_token_id, max_length=self.cfg.max_length,
                                          truncation_mode=self.cfg.truncation_mode)
        return batch, {}

    def loss(self, model, batch, reference: ReferenceFn | None = None, **inputs) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class SFT(Objective):
    batch_type = SequenceBatch

    def loss(self, model, batch, reference=None, **inputs):
        return sft_objective(model, batch, self.cfg)


class Reward(Objective):
    model_type = "reward"

    def loss(self, model, batch, reference=None, **inputs):
        return reward_objective(model, batch, self.cfg)


class DPO(Objective):
    @property
    def reference_mode(self) -> str:
        return self.cfg.reference_mode

    def loss(self, model, batch, reference=None, **inputs):
        return dpo_objective(model, batch, self.cfg, reference=reference)


class OnlineDPO(DPO):
    """DPO on sampled pairs; the scores that ranked each pair ride along for the metrics."""

    def collate(self, rows, pad_token_id: int):
        batch, _ = super().collate(rows, pad_token_id)
        scores = None
        if rows[0].get("chosen_score") is not None:
            scores = (torch.tensor([float(r["chosen_score"]) for r in rows]),
                      torch.tensor([float(r["rejected_score"]) for r in rows]))
        return batch, {"scores": scores}

    def loss(self, model, batch, reference=None, *, scores=None, beta: float, **inputs):
        return online_dpo_objective(model, batch, self.cfg, beta, scores, reference=reference)


OBJECTIVES: dict[type, type[Objective]] = {SFTConfig: SFT, DPOConfig: DPO, RewardConfig: Reward,
                                           OnlineDPOConfig: OnlineDPO}


def for_config(cfg: TrainConfig) -> Objective:
    """The objective of a job config (looked up along its class hierarchy)."""
    for cls in type(cfg).__mro__:
        if cls in OBJECTIVES:
            return OBJECTIVES[cls](cfg)
    raise TypeError(f"no objective for {type(cfg).__name__}")
