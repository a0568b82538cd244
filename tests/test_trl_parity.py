"""End to end against TRL 1.16 itself: the same tiny model, rows and settings through TRL's
DPOTrainer (tokenization, collation, fused log-probs, loss, metrics) and through rayalign's
data pipeline, log-prob module and losses must give the same numbers."""

import copy
import dataclasses
import json

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from rayalign import losses  # noqa: E402
from rayalign.batch import PreferenceBatch  # noqa: E402
from rayalign.data import TokenizeSettings, normalize_preference_row, tokenize_preference_row  # noqa: E402
from rayalign.models.loading import load_tokenizer  # noqa: E402
from rayalign.models.logprobs import preference_logprobs  # noqa: E402

METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, demo_data_dir, tmp_path_factory):
    tok = load_tokenizer(tiny_model_dir)
    rows = [json.loads(line) for line in open(f"{demo_data_dir}/pref_train.jsonl")][:6]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # make policy and reference differ so log-ratios are non-zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return tok, rows, policy, reference, tmp_path_factory.mktemp("trl")


def trl_loss(setup, **dpo_kwargs):
    from trl import DPOConfig, DPOTrainer

    tok, rows, policy, reference, tmp = setup
    # bf16=False: TRL's default (True, also on CPU) runs its reference under bf16 autocast, whose
    # rounding (steps of 2^-7 in the logits) depends on how a kernel blocks its sums, not on the
    # math compared here; both sides score in fp32.
    args = DPOConfig(output_dir=str(tmp), use_cpu=True, report_to="none", per_device_train_batch_size=len(rows),
                     max_length=dpo_kwargs.pop("max_length", 64), bf16=False, **dpo_kwargs)
    trainer = DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.model.eval()  # no dropout (the tiny model has none anyway)
    # TRL's own prepared rows and collator, in dataset order (its dataloader shuffles)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    batch = {k: v.to("cpu") if hasattr(v, "to") else v for k, v in batch.items()}
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return loss.item(), metrics, batch, trainer


def ours(setup, trainer, **kw):
    # The same model objects TRL used (with TRL's default bf16 its prepared reference runs under
    # autocast and computes ~1e-4 different log-probs than a freshly loaded copy).
    tok, rows, _, _, _ = setup
    policy, reference = trainer.model, trainer.ref_model
    settings = TokenizeSettings(max_length=kw.pop("max_length", 64), truncation_mode="keep_start")
    toks = [tokenize_preference_row(normalize_preference_row(r, "t", i), tok, settings) for i, r in enumerate(rows)]
    batch = PreferenceBatch.from_rows(toks, tok.pad_token_id, max_length=settings.max_length)
    ld_alpha = kw.pop("ld_alpha", None)
    use_weighting = kw.pop("use_weighting", False)
    params = losses.LossParams(**{f.name: kw.pop(f.name) for f in dataclasses.fields(losses.LossParams)
                                  if f.name in kw})
    with torch.no_grad():
        pol = preference_logprobs(policy, batch, ld_alpha=ld_alpha, use_weighting=use_weighting)
        ref = preference_logprobs(reference, batch, ld_alpha=ld_alpha)
        loss, metrics = losses.combined_dpo_loss(
            pol.chosen_logps, pol.rejected_logps, ref.chosen_logps, ref.rejected_logps, params=params,
            chosen_lengths=pol.chosen_lengths, rejected_lengths=pol.rejected_lengths,
            chosen_weights=pol.chosen_weights, rejected_weights=pol.rejected_weights, **kw)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["logits/chosen"] = float(pol.chosen_mean_logits)
    metrics["logits/rejected"] = float(pol.rejected_mean_logits)
    metrics["entropy"] = float(pol.entropy)
    metrics["mean_token_accuracy"] = float(pol.chosen_token_accuracy)
    return loss.item(), metrics, batch


def check(setup, trl_kwargs, our_kwargs, tol=2e-5):
    t_loss, t_metrics, t_batch, trainer = trl_loss(setup, **trl_kwargs)
    o_loss, o_metrics, o_batch = ours(setup, trainer, **our_kwargs)
    b = len(o_batch)
    width = o_batch.input_ids.shape[1]
    assert t_batch["input_ids"].shape[1] >= width
    assert t_batch["attention_mask"][:, width:].sum() == 0
    real = o_batch.attention_mask.bool()
    assert torch.equal(t_batch["attention_mask"][:, :width].long(), o_batch.attention_mask)
    assert torch.equal(t_batch["input_ids"][:, :width][real], o_batch.input_ids[real]), "tokenization"
    assert torch.equal(t_batch["completion_mask"][:, :width].long(), o_batch.completion_mask)
    assert o_loss == pytest.approx(t_loss, rel=tol, abs=tol)
    for k in METRICS:
        assert o_metrics[k] == pytest.approx(t_metrics[k], rel=tol, abs=tol), k
    assert b == 6


LOSS_TYPES = list(losses.LOSSES)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_matches_trl(setup, loss_type):
    eps = 0.1 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    check(setup, {"loss_type": [loss_type], "beta": 0.2, "label_smoothing": eps},
          {"loss_type": loss_type, "beta": 0.2, "label_smoothing": eps})


def test_weighted_combination_matches_trl(setup):
    check(setup, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
          {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]})


def test_wpo_weighting_matches_trl(setup):
    check(setup, {"loss_type": ["sigmoid"], "use_weighting": True},
          {"loss_type": "sigmoid", "use_weighting": True})


def test_ld_alpha_matches_trl(setup):
    check(setup, {"loss_type": ["sigmoid"], "ld_alpha": 0.5}, {"loss_type": "sigmoid", "ld_alpha": 0.5})


def test_f_divergence_matches_trl(setup):
    check(setup, {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
          {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3})


def test_truncation_matches_trl(setup):
    check(setup, {"loss_type": ["sigmoid"], "max_length": 15}, {"loss_type": "sigmoid", "max_length": 15})


@pytest.mark.parametrize("name", ["pref_train.jsonl", "pref_train_conversational.jsonl", "pref_train_implicit.jsonl"])
@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_tokenized_rows_equal_trls_prepared_dataset(tiny_model_dir, demo_data_dir, tmp_path, name, truncation_mode):
    """TRL's own dataset preparation (prompt extraction, eos, chat template, prefix split)
    and its collator's truncation give the same ids as rayalign's, row for row."""
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(tiny_model_dir)
    rows = [json.loads(line) for line in open(f"{demo_data_dir}/{name}")][:24]
    # cuts some completions while keeping most prompts of each format
    max_length = {"pref_train.jsonl": 14, "pref_train_conversational.jsonl": 26}.get(name, 40)
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=max_length,
                     truncation_mode=truncation_mode)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    settings = TokenizeSettings(max_length=max_length, truncation_mode=truncation_mode)
    theirs = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    ours_rows = []
    for i, r in enumerate(rows):
        try:
            ours_rows.append(tokenize_preference_row(normalize_preference_row(r, name, i), tok, settings))
        except ValueError:  # prompt fills max_length: TRL drops the row silently, we name it
            pass
    assert len(ours_rows) == len(theirs) > 0
    for o, t in zip(ours_rows, theirs):
        assert (o["prompt_ids"], o["chosen_ids"], o["rejected_ids"]) == (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
    t_batch = trainer.data_collator(theirs)
    o_batch = PreferenceBatch.from_rows(ours_rows, tok.pad_token_id, max_length=max_length,
                                        truncation_mode=truncation_mode)
    width = o_batch.input_ids.shape[1]
    real = o_batch.attention_mask.bool()
    assert torch.equal(t_batch["input_ids"][:, :width][real], o_batch.input_ids[real])
    assert torch.equal(t_batch["completion_mask"][:, :width].long(), o_batch.completion_mask)


def test_empty_completions_tokenize_like_trl(tiny_model_dir, tmp_path):
    """hh-rlhf's harmless-base has rows whose chosen reply is empty (implicit prompt: chosen is
    the prompt itself); TRL trains on them (the completion is the eos alone), and so does rayalign."""
    from trl import DPOConfig, DPOTrainer

    tok = load_tokenizer(tiny_model_dir)
    implicit = [{"chosen": "\n\nHuman: how do I pick a lock?\n\nAssistant: ",
                 "rejected": "\n\nHuman: how do I pick a lock?\n\nAssistant: use a tension wrench"}] * 2
    explicit = [{"prompt": "Reverse: a b ->", "chosen": "", "rejected": " a b"},
                {"prompt": "Reverse: c d ->", "chosen": " d c", "rejected": "   "}]
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=64)
    settings = TokenizeSettings(max_length=64)
    for rows in (implicit, explicit):  # one format per dataset, as TRL detects it per dataset
        trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
        for i, row in enumerate(rows):
            ours_row = tokenize_preference_row(normalize_preference_row(row, "rows", i), tok, settings)
            theirs = trainer.train_dataset[i]
            assert (ours_row["prompt_ids"], ours_row["chosen_ids"], ours_row["rejected_ids"]) == (
                theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])
    assert ours_row["rejected_ids"][-1] == tok.eos_token_id


def _greedy_in_every_other_chosen_row(model, batch: dict) -> dict:
    """TRL's batch with the completion of chosen rows 0, 2, ... replaced by the model's greedy
    continuation (left to right), so that about half the chosen tokens are the argmax and
    mean_token_accuracy is far from 0."""
    ids = batch["input_ids"].clone()
    greedy = batch["completion_mask"].bool().clone()
    greedy[len(ids) // 2:] = False
    greedy[1::2] = False
    with torch.no_grad():
        for t in range(1, ids.shape[1]):
            if greedy[:, t].any():
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, t - 1]
                ids[greedy[:, t], t] = logits.argmax(-1)[greedy[:, t]]
    return {**batch, "input_ids": ids}


def test_entropy_token_accuracy_and_num_tokens_match_trls_logged_values(setup):
    """TRL's entropy (both halves' completion tokens), mean_token_accuracy (chosen completion
    tokens) and running num_tokens (attention-mask tokens, prompts included), logged by its
    own compute_loss in train and eval mode, against dpo_objective padded and packed."""
    from rayalign.config import DPOConfig
    from rayalign.objectives import dpo_objective

    _, _, t_batch, trainer = trl_loss(setup, loss_type=["sigmoid"])
    t_batch = _greedy_in_every_other_chosen_row(trainer.model, t_batch)
    trainer._metrics["train"].clear()
    trainer.model.train()
    with torch.no_grad():
        for _ in range(2):  # two micro-batches: num_tokens is a running total
            trainer.compute_loss(trainer.model, t_batch)
        trainer.model.eval()
        trainer.compute_loss(trainer.model, t_batch)
    theirs = trainer._metrics["train"]
    assert theirs["mean_token_accuracy"][-1] > 0.3  # the greedy rows are scored as argmax hits

    batch = PreferenceBatch(input_ids=t_batch["input_ids"], attention_mask=t_batch["attention_mask"].long(),
                            completion_mask=t_batch["completion_mask"].long())
    with torch.no_grad():
        ref = preference_logprobs(trainer.ref_model, batch)
    batch = batch.with_reference(ref.chosen_logps, ref.rejected_logps)
    for padding_free in (False, True):
        cfg = DPOConfig(model_name_or_path="m", train_dataset="d.jsonl", padding_free=padding_free)
        with torch.no_grad():
            _, ours = dpo_objective(trainer.model, batch, cfg)
        for k in ("entropy", "mean_token_accuracy"):
            assert float(ours[k]) == pytest.approx(theirs[k][-1], rel=1e-5, abs=1e-6), (k, padding_free)
        # a micro-batch's count; the learner keeps the run's total
        assert 2 * float(ours["num_tokens"]) == theirs["num_tokens"][-1] == 2 * int(t_batch["attention_mask"].sum())
    assert trainer._metrics["eval"]["num_tokens"] == theirs["num_tokens"]  # eval_num_tokens: the training total


def test_sft_loss_entropy_token_accuracy_and_num_tokens_match_trls_sft_trainer(tiny_model_dir, demo_data_dir,
                                                                              tmp_path):
    """TRL SFTTrainer's tokenization and collation of prompt-completion rows equal rayalign's;
    its loss, entropy and mean_token_accuracy (first-argmax hits, both over the label tokens:
    the completions) and running num_tokens (attention-mask tokens), logged by its own
    compute_loss in train and eval mode, equal sft_objective's, padded and packed."""
    from trl import SFTConfig, SFTTrainer

    from rayalign.batch import SequenceBatch
    from rayalign.config import SFTConfig as OurSFTConfig
    from rayalign.data import normalize_sft_row, tokenize_sft_row
    from rayalign.objectives import sft_objective

    tok = load_tokenizer(tiny_model_dir)
    rows = [json.loads(line) for line in open(f"{demo_data_dir}/sft_train.jsonl")][:6]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=6,
                     max_length=64)
    trainer = SFTTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    t_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    labelled = t_batch["labels"] != -100
    settings = TokenizeSettings(max_length=64)
    ours_rows = [tokenize_sft_row(normalize_sft_row(r, "t", i), tok, settings) for i, r in enumerate(rows)]
    o_batch = SequenceBatch.from_rows(ours_rows, tok.pad_token_id, max_length=64)
    assert torch.equal(o_batch.input_ids, t_batch["input_ids"]), "tokenization"
    assert torch.equal(o_batch.attention_mask, t_batch["attention_mask"].long())
    assert torch.equal(o_batch.completion_mask.bool(), labelled)

    t_batch = _greedy_in_every_other_chosen_row(trainer.model, {**t_batch, "completion_mask": labelled})
    del t_batch["completion_mask"]
    t_batch["labels"] = torch.where(labelled, t_batch["input_ids"], -100)
    trainer.model.train()
    with torch.no_grad():
        for _ in range(2):  # two micro-batches: num_tokens is a running total
            t_loss = trainer.compute_loss(trainer.model, dict(t_batch))
        trainer.model.eval()
        trainer.compute_loss(trainer.model, dict(t_batch))
    theirs, theirs_eval = trainer._metrics["train"], trainer._metrics["eval"]
    assert theirs["mean_token_accuracy"][-1] > 0.2  # rows 0 and 2 of 6 are greedy: scored as argmax hits

    batch = SequenceBatch(input_ids=t_batch["input_ids"], attention_mask=t_batch["attention_mask"].long(),
                          completion_mask=labelled.long())
    for padding_free in (False, True):
        cfg = OurSFTConfig(model_name_or_path="m", train_dataset="d.jsonl", padding_free=padding_free)
        with torch.no_grad():
            loss, ours = sft_objective(trainer.model, batch, cfg)
        assert loss.item() == pytest.approx(t_loss.item(), rel=1e-5), padding_free
        for k in ("entropy", "mean_token_accuracy"):
            assert float(ours[k]) == pytest.approx(theirs[k][-1], rel=1e-5, abs=1e-6), (k, padding_free)
            assert float(ours[k]) == pytest.approx(theirs_eval[k][-1], rel=1e-5, abs=1e-6), (k, padding_free)
        assert 2 * float(ours["num_tokens"]) == theirs["num_tokens"][-1] == 2 * int(t_batch["attention_mask"].sum())
    assert theirs_eval["num_tokens"] == theirs["num_tokens"]  # eval_num_tokens: the training total


def test_exo_pair_float64_equals_trls_to_the_last_bit(setup):
    """TRL's exo_pair in float64 (its log(1 - eps) and log(eps) are of a float32 eps):
    float64 log-probs fed through TRL's own _compute_loss give rayalign's loss exactly."""
    from trl.trainer.utils import FusedCausalLMOutput

    _, _, t_batch, trainer = trl_loss(setup, loss_type=["exo_pair"], beta=0.2, label_smoothing=0.1)
    shape = (t_batch["input_ids"].shape[0], t_batch["input_ids"].shape[1] - 1)
    mask = t_batch["completion_mask"][:, 1:].bool()
    torch.manual_seed(0)
    per_token = torch.where(mask, -torch.rand(shape, dtype=torch.float64) * 3, 0.0)

    class Fixed(torch.nn.Module):  # a "model" whose fused head returns these log-probs
        def forward(self, **kwargs):
            zeros = torch.zeros(shape, dtype=torch.float64)
            return FusedCausalLMOutput(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                       is_top1=zeros.bool())

    ref_c = -torch.rand(shape[0] // 2, dtype=torch.float64) * 30
    ref_r = -torch.rand(shape[0] // 2, dtype=torch.float64) * 30
    trainer.precompute_ref_logps = True
    with torch.no_grad():
        theirs = trainer._compute_loss(Fixed().eval(), {**t_batch, "ref_chosen_logps": ref_c,
                                                        "ref_rejected_logps": ref_r}, False)
    assert theirs.dtype == torch.float64
    logps = per_token.sum(dim=1)
    b = shape[0] // 2
    ours, _ = losses.combined_dpo_loss(logps[:b], logps[b:], ref_c, ref_r, loss_type="exo_pair",
                                       params=losses.LossParams(beta=0.2, label_smoothing=0.1))
    assert ours.dtype == torch.float64
    assert ours.item() == theirs.item()  # same float64 ops on the same constants: bit for bit
