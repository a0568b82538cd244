"""Online DPO bad input: greedy sampling and broken reward functions fail before Ray starts
(naming the field or `reward_funcs[i]` and its spec) and leave output_dir as it was; a
non-finite score during the run fails the step naming its source instead of becoming a tie."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

import rayalign
from rayalign import checkpoint as ckpt
from rayalign.config import ConfigError, OnlineDPOConfig, ScoringConfig, from_dict
from rayalign.rewards import RewardSources, ScoreError
from rayalign.rewards.judges import RewardModelJudge
from tests import reward_helpers

H = "tests.reward_helpers"


@pytest.fixture(scope="module")
def prompts_file(demo_data_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("online-bad") / "prompts.jsonl"
    path.write_text("\n".join(Path(demo_data_dir, "prompts_train.jsonl").read_text().splitlines()[:64]) + "\n")
    return path


def base(model_dir, prompts_file, out, **over) -> dict:
    cfg = {"model_name_or_path": model_dir, "train_dataset": str(prompts_file), "output_dir": str(out),
           "max_steps": 1, "per_device_train_batch_size": 4, "max_length": 64, "max_new_tokens": 4,
           "temperature": 1.0, "reward_funcs": [f"{H}:length"], "logging": {"progress_bar": False},
           "learner": {"num_actors": 1, "num_cpus_per_actor": 0.5}, "reference": {"mode": "none"},
           "rollout": {"backend": "hf", "num_cpus_per_actor": 0.5}, "overwrite_output_dir": True}
    return {**cfg, **over}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """An output dir holding a finished run (a checkpoint and metrics), to be left untouched."""
    out = tmp_path / "run"
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "config.json").write_text("{}")
    (staged / "trainer_state.json").write_text('{"step": 2, "log_history": []}')
    ckpt.commit_checkpoint(str(staged), str(out), "checkpoint-2", step=2)
    (out / "metrics.jsonl").write_text('{"step": 2, "loss": 0.69}\n')
    return out


PRE_START = [
    ("temperature-zero", {"temperature": 0.0}, ConfigError, "no preference pair"),
    ("top-k-one", {"top_k": 1}, ConfigError, "with top_k=1 sampling is greedy"),
    ("do-sample-false", {"generation_kwargs": {"do_sample": False}}, ConfigError, "temperature: online DPO"),
    ("reward-raises", {"reward_funcs": [f"{H}:length", f"{H}:raises"]}, ConfigError,
     f"reward_funcs[1] ({H}:raises): raised RuntimeError: reward service unavailable"),
    ("reward-wrong-count", {"reward_funcs": [f"{H}:wrong_count"]}, ConfigError,
     f"reward_funcs[0] ({H}:wrong_count): returned 1 values for 8 completions"),
    ("reward-strings", {"reward_funcs": [f"{H}:strings"]}, ConfigError,
     f"reward_funcs[0] ({H}:strings): value 0 is 'good', not a number"),
    ("reward-all-nan", {"reward_funcs": [f"{H}:all_nan"]}, ConfigError,
     f"reward_funcs[0] ({H}:all_nan): returned no finite score"),
    ("reward-all-none", {"reward_funcs": [f"{H}:all_none"]}, ConfigError,
     f"reward_funcs[0] ({H}:all_none): returned no finite score"),
    ("nonfinite-policy", {"nonfinite_scores": "ignore"}, ConfigError, "nonfinite_scores"),
]


@pytest.mark.parametrize("case, over, error, culprit", PRE_START, ids=[c[0] for c in PRE_START])
def test_bad_online_input_is_rejected_before_ray(case, over, error, culprit, tiny_model_dir, prompts_file,
                                                finished_run, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = _snapshot(finished_run)
    ray_was_up = ray.is_initialized()
    with pytest.raises(Exception) as info:
        rayalign.train_online_dpo(base(tiny_model_dir, prompts_file, finished_run, **over))
    assert type(info.value) is error, repr(info.value)
    assert culprit in str(info.value), str(info.value)
    assert _snapshot(finished_run) == before
    if not ray_was_up:
        assert not ray.is_initialized(), "Ray was started before the input was checked"


def test_valid_trl_sampling_values_stay_accepted():
    cfg = {"model_name_or_path": "m", "train_dataset": "d", "reward_funcs": ["a:b"]}
    for over in ({"top_k": 0}, {"top_k": -1}, {"max_length": None}, {"nonfinite_scores": "penalize"}):
        from_dict(OnlineDPOConfig, {**cfg, **over})


# --------------------------------------------------------------------- during the run


def _sources(*names, nonfinite="error"):
    return RewardSources([f"{H}:{n}" for n in names], None, ScoringConfig(), max_length=64, nonfinite=nonfinite)


def _score(sources, values: list):
    return sources.score(["p"] * len(values), values, [[1]] * len(values), [True] * len(values))


@pytest.fixture
def fixed_scores(monkeypatch):
    """reward_helpers.length returns the given list instead."""
    def use(values):
        monkeypatch.setattr(reward_helpers, "length", lambda prompts, completions, **kw: list(values))
    return use


def test_a_nan_score_fails_the_step_naming_its_source(fixed_scores):
    fixed_scores([1.0, math.nan, 0.5, math.inf])
    with pytest.raises(ScoreError, match=r"reward_funcs\[0\] \(length\): 2 of 4 scores non-finite"):
        _score(_sources("length"), ["a", "b", "c", "d"])


def test_a_completion_no_source_scores_is_not_a_tie(fixed_scores):
    fixed_scores([1.0, None])
    with pytest.raises(ScoreError, match=r"completions \[1\]: every reward source returned None"):
        _score(_sources("length"), ["a", "b"])


def test_penalize_ranks_non_finite_below_every_scored_completion(fixed_scores):
    fixed_scores([1.0, math.nan, -2.0, 3.0])
    total, means = _score(_sources("length", nonfinite="penalize"), ["a", "b", "c", "d"])
    assert total.tolist() == [1.0, -3.0, -2.0, 3.0]
    assert means["rewards/length/mean"] == pytest.approx(2 / 3)
    assert means["rewards/nonfinite"] == 0.25
    fixed_scores([math.nan, math.nan])
    with pytest.raises(ScoreError, match="every completion of the step"):  # nothing left to rank by
        _score(_sources("length", nonfinite="penalize"), ["a", "b"])


def test_a_reward_model_judge_with_nan_scores_raises_or_penalizes(ray_local):
    import ray

    class Actor:  # stands in for a RewardModel actor: .score.remote(prompts, completions) -> ref
        class score:
            @staticmethod
            def remote(prompts, completions):
                return ray.put([{"a": 1.0, "b": math.nan, "c": 0.0}[c] for c in completions])

    pairs = [("a", "c"), ("a", "b"), ("b", "c"), ("b", "b")]
    with pytest.raises(ScoreError, match=r"judge \(rm\): non-finite scores for 3 of 4 pairs"):
        RewardModelJudge(Actor(), "judge (rm)").judge(["p"] * 4, pairs)
    assert RewardModelJudge(Actor(), "judge (rm)", "penalize").judge(["p"] * 4, pairs) == [0, 0, 1, -1]


@pytest.mark.slow
def test_nan_score_mid_run_fails_the_step_naming_the_function(ray_local, tiny_model_dir, prompts_file, tmp_path):
    reward_helpers.CALLS["nan_after_probe"] = 0
    cfg = base(tiny_model_dir, prompts_file, tmp_path / "run", reward_funcs=[f"{H}:length", f"{H}:nan_after_probe"])
    with pytest.raises(ScoreError) as info:
        rayalign.train_online_dpo(cfg)
    assert f"reward_funcs[1] ({H}:nan_after_probe): 1 of 8 scores non-finite" in str(info.value), str(info.value)
    assert reward_helpers.CALLS["nan_after_probe"] == 2  # the probe, then the first step's scoring
