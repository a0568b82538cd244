"""`rayalign eval-dpo` / `eval-reward` (`rayalign.evaluate_dpo` / `evaluate_reward`) against
TRL 1.16's own `DPOTrainer.evaluate()` / `RewardTrainer.evaluate()`: the same model dirs,
rows and per_device_eval_batch_size, 20 rows in batches of 8, so the short last batch shows
the averaging (eval_loss over rows, every other metric over batches)."""

import json
from pathlib import Path

import pytest
import torch

import rayalign
from rayalign import cli
from rayalign.models.loading import load_reward_model, load_tokenizer
from tests.helpers import write_head

pytestmark = pytest.mark.slow
pytest.importorskip("trl")

TIMING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time")
ROWS, BATCH = 20, 8


@pytest.fixture(scope="module")
def models(tiny_model_dir, demo_data_dir, tmp_path_factory):
    """A DPO policy (the tiny model, perturbed: log-ratios against the tiny model are not 0),
    a reward model (a seeded score head on the tiny model) and ROWS preference rows."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("offline-eval")
    tok = load_tokenizer(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    policy.save_pretrained(root / "policy")
    torch.manual_seed(0)
    load_reward_model(tiny_model_dir, pad_token_id=tok.pad_token_id).save_pretrained(root / "reward")
    for d in ("policy", "reward"):
        tok.save_pretrained(root / d)
    rows = write_head(Path(demo_data_dir, "pref_eval.jsonl"), root / "eval.jsonl", ROWS)
    return root, rows


def config(root: Path, rows: Path, **over) -> dict:
    """rayalign's side: the rows as train_dataset (eval_dataset unset: evaluation takes them)."""
    return {"model_name_or_path": str(root / "policy"), "train_dataset": str(rows), "output_dir": str(root / "out"),
            "per_device_eval_batch_size": BATCH, "max_length": 64, "logging": {"progress_bar": False},
            "learner": {"num_actors": 1, "num_cpus_per_actor": 1}, **over}


def assert_same(got: dict, want: dict, tol: float = 1e-4) -> None:
    """Every metric both report (TRL's eval_num_tokens, entropy, ... included when present),
    timings aside, within `tol` relative."""
    for key in sorted((set(got) & set(want)) - set(TIMING)):
        assert got[key] == pytest.approx(want[key], rel=tol, abs=1e-7), (key, got[key], want[key])


@pytest.fixture(scope="module")
def dpo_metrics(ray_local, models, tiny_model_dir):
    """(TRL's evaluate(), rayalign's evaluate_dpo) of the perturbed policy against the tiny model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    root, rows = models
    data = Dataset.from_list([json.loads(x) for x in rows.read_text().splitlines()])
    args = DPOConfig(output_dir=str(root / "trl-dpo"), use_cpu=True, report_to="none", bf16=False,
                     per_device_eval_batch_size=BATCH, max_length=64)
    trainer = DPOTrainer(model=str(root / "policy"), ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         args=args, train_dataset=data, eval_dataset=data,
                         processing_class=load_tokenizer(str(root / "policy")))
    want = trainer.evaluate()
    got = rayalign.evaluate_dpo(config(root, rows, reference={"model_name_or_path": tiny_model_dir,
                                                              "num_cpus_per_actor": 1}))
    return want, got


def test_evaluate_dpo_equals_trls_evaluate(dpo_metrics):
    want, got = dpo_metrics
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected", "eval_logits/chosen",
                "eval_logits/rejected", "epoch", *TIMING[:3]):
        assert key in got and key in want, key
    assert_same(got, want)
    assert got["eval_steps_per_second"] == pytest.approx(3 / got["eval_runtime"])  # ceil(20 / 8) batches
    assert got["eval_samples_per_second"] == pytest.approx(ROWS / got["eval_runtime"])


def test_two_learners_and_precomputed_reference_give_the_same_numbers(ray_local, models, tiny_model_dir, tmp_path):
    """Two learners with half the batch each, and reference log-probs from the precompute
    stage: each eval step covers the same 8 rows as one learner's batch of 8, and TRL pools a
    step's metrics over the rows of all its processes, so the metrics are one learner's."""
    root, rows = models
    head = write_head(rows, tmp_path / "head.jsonl", 16)
    ref = {"model_name_or_path": tiny_model_dir}
    one = rayalign.evaluate_dpo(config(root, head, output_dir=str(tmp_path / "one"),
                                       reference={**ref, "num_cpus_per_actor": 1}))
    two = rayalign.evaluate_dpo(config(root, head, output_dir=str(tmp_path / "two"), per_device_eval_batch_size=4,
                                       learner={"num_actors": 2, "num_cpus_per_actor": 0.5},
                                       reference={**ref, "mode": "precompute", "num_cpus_per_actor": 0.5,
                                                  "cache_dir": str(tmp_path / "cache")}))
    assert_same(two, one, tol=1e-5)
    assert two["eval_steps_per_second"] == pytest.approx(2 / two["eval_runtime"])  # 2 steps of 2 x 4 rows


def test_eval_dpo_command_writes_what_evaluate_dpo_returns(dpo_metrics, models, tiny_model_dir, tmp_path):
    """`rayalign eval-dpo --config FILE --key value`: eval_results.json holds evaluate_dpo's
    numbers; all_results.json keeps what was there and adds them (Trainer.save_metrics)."""
    import yaml

    root, rows = models
    out = tmp_path / "cli"
    out.mkdir()
    (out / "all_results.json").write_text(json.dumps({"train_loss": 0.5}))
    job_file = tmp_path / "dpo.yaml"
    cfg = config(root, rows, reference={"model_name_or_path": tiny_model_dir, "num_cpus_per_actor": 1})
    job_file.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "output_dir"}))
    assert cli.main(["eval-dpo", "--config", str(job_file), "--output_dir", str(out)]) == 0
    written = json.loads((out / "eval_results.json").read_text())
    assert set(written) == set(dpo_metrics[1])
    assert_same(written, dpo_metrics[1], tol=1e-6)
    assert json.loads((out / "all_results.json").read_text()) == {"train_loss": 0.5, **written}


def test_evaluate_reward_equals_trls_evaluate(ray_local, models):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    root, rows = models
    data = Dataset.from_list([json.loads(x) for x in rows.read_text().splitlines()])
    args = RewardConfig(output_dir=str(root / "trl-reward"), use_cpu=True, report_to="none", bf16=False,
                        per_device_eval_batch_size=BATCH, max_length=64)
    want = RewardTrainer(model=str(root / "reward"), args=args, train_dataset=data, eval_dataset=data,
                         processing_class=load_tokenizer(str(root / "reward"))).evaluate()
    got = rayalign.evaluate_reward(config(root, rows, model_name_or_path=str(root / "reward"),
                                          output_dir=str(root / "out-reward")))
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_min_reward", "eval_mean_reward",
                "eval_max_reward", "epoch", *TIMING[:3]):
        assert key in got and key in want, key
    assert_same(got, want)
    assert json.loads((root / "out-reward" / "eval_results.json").read_text()) == got
