"""Offline DPO end to end on a real local Ray: DeepSpeed learners (ZeRO-2, gloo), every
reference mode, resume, reload, LoRA, data-parallel invariance and the reference cache."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rayalign
from rayalign.batch import PreferenceBatch
from rayalign.data import TokenizeSettings, validate_file
from rayalign.models.loading import load_tokenizer
from rayalign.models.logprobs import preference_logprobs
from tests.helpers import merged, write_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(demo_data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo-data")
    write_head(Path(demo_data_dir, "pref_train.jsonl"), d / "train.jsonl", 320)
    write_head(Path(demo_data_dir, "pref_eval.jsonl"), d / "eval.jsonl", 32)
    write_head(Path(demo_data_dir, "pref_train.jsonl"), d / "eight.jsonl", 8)
    return d


def base(tiny_model_dir, small_data, out, **over):
    cfg = {
        "model_name_or_path": tiny_model_dir, "train_dataset": str(small_data / "train.jsonl"),
        "eval_dataset": str(small_data / "eval.jsonl"), "output_dir": str(out), "max_steps": 30,
        "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "learning_rate": 2e-3,
        "lr_scheduler_type": "constant", "logging_steps": 5, "eval_steps": 15, "save_steps": 15,
        "max_length": 64, "seed": 3, "logging": {"progress_bar": False},
        "learner": {"num_actors": 2, "num_cpus_per_actor": 0.5, "zero_stage": 2},
        "reference": {"mode": "precompute", "num_actors": 1, "num_cpus_per_actor": 0.5,
                      "cache_dir": str(out.parent / "ref-cache")},
    }
    return merged(cfg, over)


def metrics(out):
    return [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]


def train_rows(out):
    return [m for m in metrics(out) if "loss" in m and "eval_loss" not in m]


def assert_learned(out):
    rows = train_rows(out)
    assert rows[-1]["rewards/accuracies"] > 0.7, rows[-1]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.05
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "learning_rate",
                "grad_norm", "epoch", "entropy", "mean_token_accuracy", "num_tokens"):
        assert key in rows[-1], key
    assert 0 < rows[-1]["entropy"] and 0 <= rows[-1]["mean_token_accuracy"] <= 1
    totals = [r["num_tokens"] for r in rows]  # TRL's running count of attention-mask tokens
    assert totals == sorted(totals) and totals[0] > 0 and totals[-1] > totals[0]


@pytest.fixture(scope="module")
def precompute_run(ray_local, tiny_model_dir, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("precompute") / "run"
    # Output and reference cache given as storage URIs (shared-storage code path).
    cfg = base(tiny_model_dir, small_data, out, output_dir=f"file://{out}")
    cfg["reference"]["cache_dir"] = f"file://{out.parent / 'ref-cache'}"
    result = rayalign.train_dpo(cfg)
    return out, result


def test_precompute_mode_learns_and_writes_everything(precompute_run):
    out, result = precompute_run
    assert result["reference_cache"] == "miss"
    assert [p.name for p in (out.parent / "ref-cache").iterdir()]  # the cache went to the URI
    assert result["checkpoint"] == f"file://{out}/checkpoint-30"
    assert_learned(out)
    assert any("eval_rewards/accuracies" in m for m in metrics(out))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "metrics.png"):
        assert (out / name).exists(), name
    assert list((out / "runs").glob("events.*"))
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-15", "checkpoint-30"]
    assert (out / "checkpoint-15" / "rayalign_complete.json").exists()
    assert "eval_loss" in (out / "README.md").read_text()
    assert not list(out.rglob("*.pkl")) and not list(out.rglob("*.bin"))


def test_saved_model_reproduces_the_learners_numbers(precompute_run, tiny_model_dir, small_data):
    """The reloaded final model gives the eval log-probs the learners reported."""
    from transformers import AutoModelForCausalLM

    out, result = precompute_run
    tok = load_tokenizer(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    table, _ = validate_file(str(small_data / "eval.jsonl"), tok, TokenizeSettings(max_length=64))
    batch = PreferenceBatch.from_rows(table.to_pylist(), tok.pad_token_id, max_length=64)
    with torch.no_grad():
        lp = preference_logprobs(model, batch)
    assert lp.chosen_logps.mean().item() == pytest.approx(result["metrics"]["eval_logps/chosen"], abs=1e-3)
    assert lp.rejected_logps.mean().item() == pytest.approx(result["metrics"]["eval_logps/rejected"], abs=1e-3)


def test_resume_reproduces_the_uninterrupted_losses_and_hits_the_cache(precompute_run, tiny_model_dir,
                                                                         small_data, tmp_path):
    out, _ = precompute_run
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(out / "checkpoint-15", resumed / "checkpoint-15")
    lines = [m for m in metrics(out) if m["step"] <= 15]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    cfg = base(tiny_model_dir, small_data, resumed, resume_from_checkpoint="latest")
    cfg["reference"]["cache_dir"] = str(out.parent / "ref-cache")
    result = rayalign.train_dpo(cfg)
    assert result["reference_cache"] == "hit"
    want = {m["step"]: m["loss"] for m in train_rows(out) if m["step"] > 15}
    got = {m["step"]: m["loss"] for m in train_rows(resumed) if m["step"] > 15}
    assert got.keys() == want.keys() and len(got) == 3
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


def _cached_logps(cache_root: Path, rows: int) -> dict[int, tuple[float, float]]:
    """The cached reference log-probs of the `rows`-row data file, by row index."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(f).to_pydict() for f in cache_root.glob("*/ref_logps.parquet")]
    (t,) = [t for t in tables if len(t["row_index"]) == rows]
    return {i: (c, r) for i, c, r in zip(t["row_index"], t["ref_chosen_logps"], t["ref_rejected_logps"])}


def test_streamed_precompute_scores_what_scoring_before_training_does(precompute_run, tiny_model_dir,
                                                                      small_data, tmp_path):
    """On one node precompute scores everything before training (reference.precompute_schedule
    auto); streaming the scores while training must give the same cache and a run that learns."""
    out, _ = precompute_run
    stream = tmp_path / "stream"
    cfg = base(tiny_model_dir, small_data, stream, save_steps=None, eval_steps=None, eval_dataset=None,
               reference={"precompute_schedule": "stream", "cache_dir": str(tmp_path / "cache")})
    assert rayalign.train_dpo(cfg)["reference_cache"] == "miss"
    assert_learned(stream)
    want, got = _cached_logps(out.parent / "ref-cache", 320), _cached_logps(tmp_path / "cache", 320)
    assert got.keys() == want.keys() and len(got) == 320
    for i in want:
        assert got[i] == pytest.approx(want[i], abs=1e-4), i


def test_reference_actor_mode_learns(ray_local, tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "actor"
    rayalign.train_dpo(base(tiny_model_dir, small_data, out, save_steps=None, eval_steps=None,
                            reference={"mode": "actor"}))
    assert_learned(out)


def test_implicit_lora_reference_saves_only_the_adapter(ray_local, tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "lora"
    rayalign.train_dpo(base(tiny_model_dir, small_data, out, learning_rate=1e-2, save_steps=None, eval_steps=None,
                            lora={"enabled": True, "r": 8, "alpha": 16},
                            reference={"mode": "implicit"}))
    rows = train_rows(out)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert rows[-1]["rewards/accuracies"] > 0.5
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert not (out / "model.safetensors").exists()
    assert all("lora" in k for k in load_file(str(out / "adapter_model.safetensors")))
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(str(out))


def test_two_learners_equal_one_learner_on_the_union_batch(ray_local, tiny_model_dir, small_data, tmp_path):
    """2 learners x 4 pairs and 1 learner x 8 pairs take the same first step, with the pairs
    dealt across the learners by tokens (learner.balance_tokens, the default) or as the stream
    split them."""
    common = {"train_dataset": str(small_data / "eight.jsonl"), "eval_dataset": None, "max_steps": 1,
              "save_steps": None, "eval_steps": None, "logging_steps": 1, "adam_epsilon": 1.0,
              "learning_rate": 1e-2}
    one = rayalign.train_dpo(base(tiny_model_dir, small_data, tmp_path / "one", per_device_train_batch_size=8,
                                  learner={"num_actors": 1}, reference={"mode": "actor"}, **common))
    two = rayalign.train_dpo(base(tiny_model_dir, small_data, tmp_path / "two", per_device_train_batch_size=4,
                                  reference={"mode": "actor"}, **common))
    split = rayalign.train_dpo(base(tiny_model_dir, small_data, tmp_path / "split", per_device_train_batch_size=4,
                                    reference={"mode": "actor"}, learner={"balance_tokens": False}, **common))
    for run in (two, split):
        assert run["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5)
        assert run["metrics"]["grad_norm"] == pytest.approx(one["metrics"]["grad_norm"], rel=1e-4)
    (logged,) = train_rows(tmp_path / "two")
    assert 1.0 <= logged["perf/rank_tokens_imbalance"] <= logged["perf/rank_tokens_imbalance_unbalanced"]
    assert "perf/rank_tokens_imbalance" not in train_rows(tmp_path / "split")[0]
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    moved = max((a[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4  # the step did something
    assert max((a[k] - b[k]).abs().max().item() for k in start) < 1e-3 * moved + 1e-7


POOLED = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")  # TRL: sums and counts gathered
PER_ROW = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")  # TRL: every process's rows gathered, then the mean


def _trl_metrics(policy_dir: str, ref_dir: str, rows_file: Path, out: Path) -> dict[str, float]:
    """TRL's DPOTrainer metrics on all rows of `rows_file` as one batch (its own compute_loss)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
    # bf16=False like the learners on CPU (TRL would run its prepared reference under bf16 autocast)
    args = DPOConfig(output_dir=str(out), use_cpu=True, report_to="none", per_device_train_batch_size=len(rows),
                     max_length=64, bf16=False)
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(policy_dir),
                         ref_model=AutoModelForCausalLM.from_pretrained(ref_dir), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(policy_dir))
    trainer.model.train()  # train mode counts num_tokens (the tiny model has no dropout)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return {"loss": loss.item(), **{k: v[-1] for k, v in trainer._metrics["train"].items()}}


def test_two_learners_log_what_one_learner_and_trl_log(ray_local, tiny_model_dir, small_data, tmp_path):
    """TRL pools entropy, mean_token_accuracy and logits/* over processes (token sums and counts
    gathered, then divided) and averages rewards/* and logps/* over all processes' rows: 2
    learners x 4 pairs must log what 1 learner x 8 pairs logs, in the training step and in an
    evaluation step (2 x 4 or 1 x 8 eval pairs), and both what TRL's DPOTrainer computes on the
    8 pairs (learning_rate 0: the evaluation sees the same model as the step)."""
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # a reference unlike the policy: non-zero rewards
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref_dir = tmp_path / "reference"
    reference.save_pretrained(ref_dir)
    eight = small_data / "eight.jsonl"
    common = {"train_dataset": str(eight), "eval_dataset": str(eight), "max_steps": 1, "save_steps": None,
              "eval_steps": None, "logging_steps": 1, "learning_rate": 0.0,
              "reference": {"mode": "actor", "model_name_or_path": str(ref_dir)}}
    logged = {}
    for name, learners, per in (("one", 1, 8), ("two", 2, 4)):
        out = tmp_path / name
        rayalign.train_dpo(base(tiny_model_dir, small_data, out, per_device_train_batch_size=per,
                                per_device_eval_batch_size=per, learner={"num_actors": learners}, **common))
        (evals,) = [m for m in metrics(out) if "eval_loss" in m]
        logged[name] = {"train": train_rows(out)[0], "eval": {k[5:]: v for k, v in evals.items()
                                                              if k.startswith("eval_")}}
    theirs = _trl_metrics(tiny_model_dir, str(ref_dir), eight, tmp_path / "trl")
    assert 0.02 < theirs["mean_token_accuracy"] < 0.5 and abs(theirs["rewards/margins"]) > 1e-3
    for mode in ("train", "eval"):
        one, two = logged["one"][mode], logged["two"][mode]
        for k in POOLED + PER_ROW + ("loss",):
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), (mode, k)
            assert one[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-6), (mode, k)
        print(mode, {k: (one[k], two[k], theirs[k]) for k in POOLED + PER_ROW})
    assert logged["two"]["train"]["num_tokens"] == logged["one"]["train"]["num_tokens"] == theirs["num_tokens"]


def test_bad_input_fails_before_any_actor_starts(ray_local, tiny_model_dir, small_data, tmp_path):
    from rayalign.config import ConfigError
    from rayalign.data import DataError

    out = tmp_path / "bad"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": " a", "rejected": " a"}\n')
    with pytest.raises(DataError, match="bad.jsonl row 0"):
        rayalign.train_dpo(base(tiny_model_dir, small_data, out, train_dataset=str(bad)))
    with pytest.raises(ConfigError, match="beta"):
        rayalign.train_dpo(base(tiny_model_dir, small_data, out, beta=0.0))
    assert not out.exists() or not any(out.iterdir())


def test_zero3_trdpo_generation_and_gradient_checkpointing(ray_local, tiny_model_dir, small_data, tmp_path):
    """ZeRO-3 learners with gradient checkpointing; TR-DPO mixes the policy into the reference
    actors (the run departs from an identical run without sync right after the sync step);
    generate_during_eval logs a policy/reference completion table."""

    def run(name, sync):
        out = tmp_path / name
        rayalign.train_dpo(base(
            tiny_model_dir, small_data, out, max_steps=10, save_steps=None, eval_steps=None, logging_steps=5,
            sync_ref_model=sync, ref_model_sync_steps=5, ref_model_mixup_alpha=0.5, gradient_checkpointing=True,
            generate_during_eval=sync, num_generate_prompts=3, max_new_tokens=6,
            learner={"zero_stage": 3}, reference={"mode": "actor"}))
        return out

    synced, plain = run("sync", True), run("plain", False)
    a, b = train_rows(synced), train_rows(plain)
    assert a[0]["rewards/chosen"] == pytest.approx(b[0]["rewards/chosen"], rel=1e-4, abs=1e-6)  # before the sync
    # rewards = beta * (policy - reference): with an unchanged reference their difference would
    # be beta * the policy's difference; it is far larger, so the reference moved at step 5.
    d_rewards = abs(a[1]["rewards/chosen"] - b[1]["rewards/chosen"])
    d_policy = abs(a[1]["logps/chosen"] - b[1]["logps/chosen"])
    assert d_rewards > 2 * 0.1 * d_policy + 1e-4, (d_rewards, d_policy)
    table = [json.loads(x) for x in (synced / "tables" / "generate_during_eval.jsonl").read_text().splitlines()]
    assert len(table) == 3 and all(r["prompt"] and isinstance(r["policy"], str) for r in table)
    assert all(isinstance(r["reference"], str) for r in table)
    assert (synced / "model.safetensors").exists()


def test_sft_job_lowers_the_loss(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    out = tmp_path / "sft"
    result = rayalign.train_sft({
        "model_name_or_path": tiny_model_dir, "train_dataset": f"{demo_data_dir}/sft_train.jsonl",
        "eval_dataset": f"{demo_data_dir}/sft_eval.jsonl", "output_dir": str(out), "max_steps": 40,
        "per_device_train_batch_size": 32, "learning_rate": 3e-3, "logging_steps": 10, "max_length": 64,
        "logging": {"progress_bar": False}, "learner": {"num_actors": 1, "num_cpus_per_actor": 1}})
    rows = train_rows(out)
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert result["metrics"]["eval_loss"] < rows[0]["loss"]
    # TRL SFTTrainer's metrics: the completions grow likelier, so more of their tokens are the argmax
    assert rows[-1]["mean_token_accuracy"] > rows[0]["mean_token_accuracy"] + 0.1
    assert 0 < rows[-1]["entropy"] < rows[0]["entropy"]
    assert "eval_mean_token_accuracy" in result["metrics"] and rows[-1]["num_tokens"] > rows[0]["num_tokens"] > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))


def test_reference_free_runs_without_any_reference(ray_local, tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "free"
    result = rayalign.train_dpo(base(tiny_model_dir, small_data, out, max_steps=20, save_steps=None,
                                     eval_steps=5, reference_free=True))
    assert result["reference_cache"] is None  # no precompute stage, no reference actors
    rows = train_rows(out)
    # with the reference at 0, rewards are beta * the policy's own log-probs
    assert rows[-1]["rewards/chosen"] == pytest.approx(0.1 * rows[-1]["logps/chosen"], rel=1e-5)
    evals = [m for m in metrics(out) if "eval_loss" in m]
    assert len(evals) == 4 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # same eval pairs, lower loss


@pytest.mark.parametrize("mode", ["precompute", "actor"])
def test_a_custom_resource_no_node_has_fails_before_training(tiny_model_dir, small_data, tmp_path, mode):
    """reference.resources names nodes the cluster does not have: a ClusterError naming the field,
    before any step (a Ray Data stage would otherwise wait for such a node for ever)."""
    from rayalign.actors.group import ClusterError

    out = tmp_path / "run"
    cfg = base(tiny_model_dir, small_data, out, eval_dataset=None, max_steps=2)
    cfg["reference"] = {**cfg["reference"], "mode": mode, "resources": {"ref_node": 1},
                        "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ClusterError, match=r"reference\.resources: no node of this Ray cluster has \['ref_node'\]"):
        rayalign.train_dpo(cfg)
    assert not list(out.glob("checkpoint-*"))
