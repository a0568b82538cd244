"""TRL's PEFT reference options for offline DPO: a LoRA adapter dir as the starting policy,
two adapters (trained + frozen reference copy), force_use_ref_model with a separately loaded
reference (actor or precompute), adapter-only checkpoints, and the config errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rayalign
from rayalign.batch import PreferenceBatch
from rayalign.config import ConfigError, DPOConfig, load_config
from rayalign.data import TokenizeSettings, validate_file
from rayalign.models.loading import load_causal_lm, load_tokenizer
from rayalign.models.logprobs import preference_logprobs
from tests.helpers import merged, write_head

REF = "reference"


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A LoRA adapter on the tiny model with non-zero lora_B (so it changes the model), saved
    with save_pretrained: adapter files only, no tokenizer (the base model's is used)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_causal_lm(tiny_model_dir),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    out = tmp_path_factory.mktemp("adapter") / "sft-adapter"
    model.save_pretrained(str(out))
    assert not (out / "tokenizer.json").exists()
    return str(out)


@pytest.fixture(scope="module")
def data(demo_data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("peft-data")
    write_head(Path(demo_data_dir, "pref_train.jsonl"), d / "train.jsonl", 320)
    return d


def run_cfg(adapter_dir, data, out, **over):
    cfg = {"model_name_or_path": adapter_dir, "train_dataset": str(data / "train.jsonl"), "output_dir": str(out),
           "max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "lr_scheduler_type": "constant",
           "logging_steps": 1, "max_length": 64, "seed": 3, "logging": {"progress_bar": False},
           "lora": {"enabled": True},
           "learner": {"num_actors": 1, "num_cpus_per_actor": 0.5, "zero_stage": 2},
           "reference": {"num_actors": 1, "num_cpus_per_actor": 0.5, "cache_dir": str(out.parent / "ref-cache")}}
    return merged(cfg, over)


def train_rows(out):
    rows = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if "loss" in m and "eval_loss" not in m]


def ref_logps(rows, beta=0.1):
    """Reference log-probs (batch means) recovered from the logged metrics:
    rewards = beta * (policy - reference)."""
    return [(r["logps/chosen"] - r["rewards/chosen"] / beta, r["logps/rejected"] - r["rewards/rejected"] / beta)
            for r in rows]


# ----------------------------------------------------------------------------- no Ray


def test_reference_adapter_equals_the_merged_reference_model(adapter_dir, tiny_model_dir, data):
    """Per example: the frozen reference adapter inside the policy model gives the log-probs of
    the adapter dir loaded as a separate (merged) reference model, while the trained adapter —
    moved away from its start — gives different ones and is active again afterwards."""
    from peft import TaskType

    from rayalign.actors.reference import load_reference_model
    from rayalign.models import adapters

    two = load_config(DPOConfig, None, {"model_name_or_path": adapter_dir, "train_dataset": "x",
                                        "lora": {"enabled": True}, "ref_adapter_name": REF})
    sep = load_config(DPOConfig, None, {"model_name_or_path": adapter_dir, "train_dataset": "x",
                                        "lora": {"enabled": True}, "force_use_ref_model": True,
                                        "reference": {"model_name_or_path": adapter_dir}})
    assert two.reference_mode == "adapter" and sep.reference_mode == "actor"
    tok = load_tokenizer(adapter_dir)  # falls back to the base model's tokenizer
    table, _ = validate_file(str(data / "train.jsonl"), tok, TokenizeSettings(max_length=64))
    batch = PreferenceBatch.from_rows(table.to_pylist()[:16], tok.pad_token_id, max_length=64)

    policy = adapters.wrap_policy(load_causal_lm(tiny_model_dir), two, TaskType.CAUSAL_LM)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    with torch.no_grad():  # stand-in for training: move the trained adapter only
        for name, p in policy.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.1 * torch.randn_like(p))
        before = preference_logprobs(policy, batch).chosen_logps
        with adapters.reference_weights(policy, two):
            inside = preference_logprobs(policy, batch)
        after = preference_logprobs(policy, batch).chosen_logps
        merged = preference_logprobs(load_reference_model(sep), batch)
    diff = max((inside.chosen_logps - merged.chosen_logps).abs().max().item(),
               (inside.rejected_logps - merged.rejected_logps).abs().max().item())
    print(f"max |two-adapter reference - merged reference model| log-prob: {diff:.3g}")
    assert diff < 1e-4
    assert (before - inside.chosen_logps).abs().max().item() > 1e-2  # the switch really happened
    assert torch.equal(before, after) and policy.active_adapter == "default"
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable


def test_fresh_lora_with_a_reference_adapter_starts_at_the_base_model(tiny_model_dir, data):
    """lora.enabled without an adapter dir: the frozen copy of the fresh adapter (lora_B = 0)
    is the base model; only the trained adapter has gradients; a checkpoint of it holds no
    reference tensors even when the state dict passed in has them."""
    from peft import TaskType

    from rayalign.models import adapters

    cfg = load_config(DPOConfig, None, {"model_name_or_path": tiny_model_dir, "train_dataset": "x",
                                        "lora": {"enabled": True, "r": 4}, "model_adapter_name": "policy",
                                        "ref_adapter_name": REF})
    tok = load_tokenizer(tiny_model_dir)
    table, _ = validate_file(str(data / "train.jsonl"), tok, TokenizeSettings(max_length=64))
    batch = PreferenceBatch.from_rows(table.to_pylist()[:8], tok.pad_token_id, max_length=64)
    policy = adapters.wrap_policy(load_causal_lm(tiny_model_dir), cfg, TaskType.CAUSAL_LM)
    assert all(".policy." in n for n, p in policy.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B.policy" in name:
                p.add_(0.1 * torch.randn_like(p))
        with adapters.reference_weights(policy, cfg):
            ref = preference_logprobs(policy, batch).chosen_logps
        base = preference_logprobs(load_causal_lm(tiny_model_dir), batch).chosen_logps
        moved = preference_logprobs(policy, batch).chosen_logps
    assert (ref - base).abs().max().item() < 1e-4 and (moved - base).abs().max().item() > 1e-2
    out = data / "fresh-save"
    adapters.save_trained_adapter(policy, str(out), dict(policy.state_dict()), cfg)
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not (out / "policy").exists() and not (out / REF).exists()
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == 2 * 2 * 2  # lora_A + lora_B on q/v (PEFT's llama default) in 2 layers: the trained one only
    b = next(v for k, v in saved.items() if "lora_B" in k)
    assert b.abs().max().item() > 0  # the moved adapter, not the zero-initialised reference copy


# ----------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def two_adapter_run(ray_local, adapter_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-adapter") / "run"
    result = rayalign.train_dpo(run_cfg(adapter_dir, data, out, ref_adapter_name=REF))
    return out, result


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["actor", "precompute"])
def test_adapter_reference_matches_a_separate_reference_model(two_adapter_run, adapter_dir, data, tmp_path, mode):
    """Same starting adapter, same data: the two-adapter run and a run with a separately loaded
    reference (force_use_ref_model, reference = the adapter dir: a Reference actor or the
    precompute stage) see the same reference log-probs and take the same steps."""
    out, _ = two_adapter_run
    other = tmp_path / mode
    rayalign.train_dpo(run_cfg(adapter_dir, data, other, force_use_ref_model=True,
                               reference={"mode": mode, "model_name_or_path": adapter_dir}))
    a, b = train_rows(out), train_rows(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    # step 1 runs before any update: policy and reference are the same adapter
    assert abs(a[0]["rewards/chosen"]) < 1e-5 and abs(a[0]["rewards/rejected"]) < 1e-5
    diffs = [abs(x - y) for ra, rb in zip(ref_logps(a), ref_logps(b)) for x, y in zip(ra, rb)]
    print(f"{mode}: max |reference log-prob mean difference| over 3 steps: {max(diffs):.3g}")
    assert max(diffs) < 1e-4
    for ra, rb in zip(a, b):  # a frozen reference both ways: the same updates
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    assert a[-1]["rewards/margins"] != 0.0  # and the policy moved away from the reference


@pytest.mark.slow
def test_two_adapter_checkpoint_holds_only_the_trained_adapter(two_adapter_run, adapter_dir, tiny_model_dir):
    from peft import PeftModel

    out, result = two_adapter_run
    start = load_file(str(Path(adapter_dir, "adapter_model.safetensors")))
    for d in (out, out / "checkpoint-3"):
        names = {p.name for p in d.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= names, names
        assert "model.safetensors" not in names and REF not in names and "default" not in names
        saved = load_file(str(d / "adapter_model.safetensors"))
        assert saved.keys() == start.keys()  # the trained adapter's tensors, nothing else
        assert not [k for k in saved if REF in k]
        config = json.loads((d / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == tiny_model_dir and config["r"] == 16
    moved = max((saved[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-4, "training did not change the adapter"
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(out))
    assert list(model.peft_config) == ["default"]
    got = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert max((got[k] - saved[k]).abs().max().item() for k in saved) == 0.0


@pytest.mark.slow
def test_adapter_dir_policy_learns_with_the_implicit_reference(ray_local, adapter_dir, data, tmp_path):
    """Continuing an adapter with reference.mode=implicit: the reference is the base model
    (adapter off), so step 1 already shows the loaded adapter's rewards; the run learns."""
    out = tmp_path / "implicit"
    rayalign.train_dpo(run_cfg(adapter_dir, data, out, max_steps=60, per_device_train_batch_size=16,
                               learning_rate=2e-3, reference={"mode": "implicit"}))
    rows = train_rows(out)
    assert len(rows) == 60
    assert abs(rows[0]["rewards/chosen"]) > 1e-3  # the adapter was loaded, not freshly initialised

    def window(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    first, last = rows[:10], rows[-10:]
    print("implicit, steps 1-10 -> 51-60:", {k: (round(window(first, k), 3), round(window(last, k), 3))
                                             for k in ("loss", "rewards/margins", "rewards/accuracies")})
    assert window(last, "loss") < window(first, "loss") - 0.03
    assert window(last, "rewards/margins") > window(first, "rewards/margins") + 0.05
    assert window(last, "rewards/accuracies") > 0.7
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("over, field", [
    ({"ref_adapter_name": REF}, "ref_adapter_name"),  # no LoRA policy
    ({"lora": {"enabled": True}, "ref_adapter_name": "default"}, "ref_adapter_name"),  # == model_adapter_name
    ({"lora": {"enabled": True}, "model_adapter_name": "pol", "ref_adapter_name": "pol"}, "ref_adapter_name"),
    ({"lora": {"enabled": True}, "ref_adapter_name": REF, "force_use_ref_model": True}, "ref_adapter_name"),
    ({"lora": {"enabled": True}, "ref_adapter_name": REF, "reference": {"mode": "implicit"}}, "ref_adapter_name"),
    ({"lora": {"enabled": True}, "ref_adapter_name": REF, "precompute_ref_log_probs": True}, "ref_adapter_name"),
    ({"lora": {"enabled": True}, "ref_adapter_name": REF, "reference_free": True}, "ref_adapter_name"),
    ({"lora": {"enabled": True}, "ref_adapter_name": "ref.copy"}, "ref_adapter_name"),
    ({"lora": {"enabled": True}, "model_adapter_name": "train", "reference": {"mode": "implicit"}},
     "model_adapter_name"),  # an nn.Module attribute: PEFT cannot use it
    ({"lora": {"enabled": True}, "reference": {"mode": "actor"}}, "reference.mode"),  # needs force_use_ref_model
    ({"lora": {"enabled": True}, "reference": {"mode": "precompute"}}, "reference.mode"),
    ({"lora": {"enabled": True}, "precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
    ({"lora": {"enabled": True}, "force_use_ref_model": True, "reference": {"mode": "implicit"}},
     "force_use_ref_model"),
    ({"force_use_ref_model": True, "reference_free": True}, "force_use_ref_model"),
    ({"lora": {"enabled": True}, "force_use_ref_model": True, "sync_ref_model": True}, "sync_ref_model"),
    ({"model_name_or_path": "{adapter}"}, "lora.enabled"),  # an adapter dir needs lora.enabled
    ({"model_name_or_path": "{adapter}", "lora": {"enabled": True}, "reference": {"mode": "implicit"},
      "learner": {"zero_stage": 3}}, "lora.enabled"),
])
def test_impossible_peft_reference_combinations_name_the_field(over, field, adapter_dir):
    cfg = {"model_name_or_path": "m", "train_dataset": "d.jsonl",
           **{k: v.replace("{adapter}", adapter_dir) if isinstance(v, str) else v for k, v in over.items()}}
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, cfg)
    assert str(err.value).startswith(field), str(err.value)


@pytest.mark.parametrize("over, mode", [
    ({"lora": {"enabled": True}, "ref_adapter_name": REF}, "adapter"),
    ({"model_name_or_path": "{adapter}", "lora": {"enabled": True}, "ref_adapter_name": REF}, "adapter"),
    ({"model_name_or_path": "{adapter}", "lora": {"enabled": True}, "reference": {"mode": "implicit"}}, "implicit"),
    ({"lora": {"enabled": True}, "force_use_ref_model": True}, "actor"),
    ({"lora": {"enabled": True}, "force_use_ref_model": True, "precompute_ref_log_probs": True}, "precompute"),
    ({"force_use_ref_model": True}, "actor"),  # a full-model policy: always a separate reference
])
def test_possible_peft_reference_combinations(over, mode, adapter_dir):
    cfg = {"model_name_or_path": "m", "train_dataset": "d.jsonl",
           **{k: v.replace("{adapter}", adapter_dir) if isinstance(v, str) else v for k, v in over.items()}}
    assert load_config(DPOConfig, None, cfg).reference_mode == mode
