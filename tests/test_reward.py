"""Reward-model training: TRL 1.16 RewardTrainer parity, and the job on a real local Ray."""

import copy
import json
from pathlib import Path

import pytest
import ray
import torch

import rayalign
from rayalign.batch import PreferenceBatch
from rayalign.config import RewardConfig, from_dict
from rayalign.data import TokenizeSettings, normalize_preference_row, tokenize_preference_row
from rayalign.models.loading import load_reward_model, load_tokenizer
from rayalign.objectives import reward_objective


@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_and_metrics_equal_trl(tiny_model_dir, demo_data_dir, tmp_path, center):
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    tok = load_tokenizer(tiny_model_dir)
    rows = [json.loads(x) for x in Path(demo_data_dir, "pref_train.jsonl").read_text().splitlines()[:6]]
    for i, r in enumerate(rows):
        r["margin"] = 0.1 * i
    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir, pad_token_id=tok.pad_token_id)
    trainer = RewardTrainer(model=copy.deepcopy(model), processing_class=tok, train_dataset=Dataset.from_list(rows),
                            args=TRLRewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                 center_rewards_coefficient=center, max_length=64))
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        t_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    t_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    toks = [tokenize_preference_row(normalize_preference_row(r, "t", i), tok, TokenizeSettings(max_length=64))
            for i, r in enumerate(rows)]
    ours = PreferenceBatch.from_rows(toks, tok.pad_token_id, max_length=64)
    real = ours.attention_mask.bool()
    assert torch.equal(batch["input_ids"][:, : ours.input_ids.shape[1]][real], ours.input_ids[real])
    cfg = from_dict(RewardConfig, {"model_name_or_path": "m", "train_dataset": "d",
                                   "center_rewards_coefficient": center})
    with torch.no_grad():
        loss, metrics = reward_objective(trainer.model, ours, cfg)
    assert loss.item() == pytest.approx(t_loss, rel=1e-5, abs=1e-6)
    for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert metrics[key].item() == pytest.approx(t_metrics[key], rel=1e-5, abs=1e-6), key


def test_over_length_pairs_are_dropped_as_trls_reward_trainer_drops_them(ray_local, tiny_model_dir, demo_data_dir,
                                                                          tmp_path):
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    from rayalign.data import DataError
    from rayalign.drivers.common import prepare_data

    rows = [json.loads(x) for x in Path(demo_data_dir, "pref_train.jsonl").read_text().splitlines()[:200]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(tiny_model_dir)
    max_length = 20
    trainer = RewardTrainer(model=load_reward_model(tiny_model_dir, pad_token_id=tok.pad_token_id),
                            processing_class=tok, train_dataset=Dataset.from_list(rows),
                            args=TRLRewardConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none",
                                                 max_length=max_length))
    kept = trainer.train_dataset
    assert 20 < len(kept) < 180  # the bound splits this data: the test sees both sides of it

    def cfg(length):
        return from_dict(RewardConfig, {"model_name_or_path": tiny_model_dir, "train_dataset": str(path),
                                        "output_dir": str(tmp_path / "out"), "max_length": length,
                                        "per_device_train_batch_size": 2})

    data = prepare_data(cfg(max_length), "reward")
    data.build(cfg(max_length))  # tokenized (and filtered) across the local Ray cluster
    ours = data.train.dataset.take_all()
    assert [list(r["prompt_ids"]) + list(r["chosen_ids"]) for r in ours] == kept["chosen_ids"]
    assert [list(r["prompt_ids"]) + list(r["rejected_ids"]) for r in ours] == kept["rejected_ids"]
    with pytest.raises(DataError, match=r"train_dataset: .*pairs.jsonl: every pair is longer than max_length=4"):
        prepare_data(cfg(4), "reward").build(cfg(4))


@pytest.fixture(scope="module")
def sft_model(ray_local, tiny_model_dir, demo_data_dir, tmp_path_factory):
    """The demo's SFT model (400 steps with warmup, ~0.6 greedy correctness) that the reward
    model starts from. The session's `sft_model_dir` (300 steps, ~0.2) is too weak a base:
    from it the classifier stays near 0.67."""
    out = tmp_path_factory.mktemp("sft-rm") / "model"
    rayalign.train_sft({
        "model_name_or_path": tiny_model_dir, "train_dataset": f"{demo_data_dir}/sft_train.jsonl",
        "output_dir": str(out), "max_steps": 400, "per_device_train_batch_size": 32, "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 100, "max_length": 64,
        "save_total_limit": 1, "logging": {"progress_bar": False},
        "learner": {"num_actors": 1, "num_cpus_per_actor": 1}})
    return str(out)


@pytest.mark.slow
def test_reward_job_learns_and_reloads(ray_local, sft_model, demo_data_dir, tmp_path):
    out = tmp_path / "rm"
    result = rayalign.train_reward({
        "model_name_or_path": sft_model, "train_dataset": f"{demo_data_dir}/pref_train.jsonl",
        "eval_dataset": f"{demo_data_dir}/pref_eval.jsonl", "output_dir": str(out), "max_steps": 300,
        "per_device_train_batch_size": 16, "learning_rate": 1e-3, "lr_scheduler_type": "cosine",
        "logging_steps": 25, "eval_steps": 100, "max_length": 64, "seed": 0, "logging": {"progress_bar": False},
        "learner": {"num_actors": 2, "num_cpus_per_actor": 0.5, "zero_stage": 2}})
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in x]
    # Held-out loss is the robust signal: it falls steadily (one run: 0.604, 0.496, 0.465 at steps
    # 100/200/300; ln 2 = 0.693 for a classifier that learned nothing). Accuracy on 200 pairs is
    # noisy and near its ceiling for this model: 0.66-0.77 at step 300 over six runs that differed
    # only in seed or float summation order (packed vs padded). A 2-layer, 64-wide classifier
    # reading one pooled position must compare up to nine mirrored letters; DPO's token-level
    # implicit reward reaches 0.99 on the same pairs. Issue 14 tracks a reward model worth 0.9.
    assert evals[-1]["eval_loss"] < 0.6 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05, evals
    assert evals[-1]["eval_accuracy"] >= 0.62, evals
    assert (out / "model.safetensors").exists() and "eval_accuracy" in (out / "README.md").read_text()

    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=1)
    from rayalign.actors.reward import RewardModel, RewardModelConfig

    scorer = ray.remote(RewardModel).options(num_cpus=0.5).remote(RewardModelConfig(str(out), max_length=64))
    rows = [json.loads(x) for x in Path(demo_data_dir, "pref_eval.jsonl").read_text().splitlines()]
    chosen = ray.get(scorer.score.remote([r["prompt"] for r in rows], [r["chosen"] for r in rows]))
    rejected = ray.get(scorer.score.remote([r["prompt"] for r in rows], [r["rejected"] for r in rows]))
    # TRL's rule with 2 processes: each eval step covers one batch of 8 per learner (16 rows in
    # file order, the last step 8), and the logged value is the mean of the steps' values
    steps = [range(i, min(i + 16, len(rows))) for i in range(0, len(rows), 16)]
    accuracy = sum(sum(chosen[i] > rejected[i] for i in s) / len(s) for s in steps) / len(steps)
    mean_reward = sum(sum(chosen[i] + rejected[i] for i in s) / (2 * len(s)) for s in steps) / len(steps)
    assert accuracy == pytest.approx(result["metrics"]["eval_accuracy"], abs=1e-6)
    assert mean_reward == pytest.approx(result["metrics"]["eval_mean_reward"], abs=1e-3)


@pytest.mark.slow
def test_lora_reward_model_saves_adapter_and_score_head(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from safetensors.torch import load_file

    out = tmp_path / "rm-lora"
    rayalign.train_reward({
        "model_name_or_path": tiny_model_dir, "train_dataset": f"{demo_data_dir}/pref_eval.jsonl",
        "output_dir": str(out), "max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
        "logging_steps": 5, "max_length": 64, "logging": {"progress_bar": False},
        "lora": {"enabled": True, "r": 4, "alpha": 8}, "learner": {"num_actors": 1, "num_cpus_per_actor": 1}})
    keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert any("score" in k for k in keys) and any("lora" in k for k in keys)
    assert not (out / "model.safetensors").exists()

    def saved_head(seed):  # a head re-initialised at load would differ between seeds
        torch.manual_seed(seed)
        model = AutoPeftModelForSequenceClassification.from_pretrained(str(out), num_labels=1)
        return next(v for k, v in model.named_parameters() if "score" in k and "modules_to_save" in k).detach()

    assert torch.equal(saved_head(1), saved_head(2))
