"""Ranking samples: judge answers parsed from free text (malformed ones included), position
swapping, weighted reward functions and reward models with the missing-eos penalty, and the
two judges (reward-model judge, LLM-as-judge on a rollout actor) on a real local Ray."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rayalign.config import ConfigError, JudgeConfig, ScoringConfig
from rayalign.rewards import RewardSources, check_reward_sources
from rayalign.rewards.judges import build_judge, judge_pairs, parse_judgment


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("1", 1), (" 1\n", 1), ("1.", 1), ("(0)", 0), ("0: the first is right", 0),
    ("Response 1 is better.", 1), ("I prefer response 0", 0), ("Answer: 1", 1), ("answer #0", 0),
    ("B", 1), ("(A)", 0), ("Response B", 1), ("The second one.", 1), ("the first", 0),
    # malformed: nothing, no answer, a leading answer wins, out-of-range numbers, decimals,
    # words that start with A/B, non-text
    ("", None), ("   ", None), ("banana", None), ("0 or 1", 0), ("10", None), ("0.5", None),
    ("2", None), ("Both are fine", None), ("A tie.", None), ("B is better", 1), ("A wins", 0), (None, None), (1, None),
])
def test_parse_judgment(text, expected):
    assert parse_judgment(text) == expected


class AlwaysFirst:
    """A judge with total position bias: whatever is shown first wins."""

    def __init__(self):
        self.seen = []

    def judge(self, prompts, pairs):
        self.seen.extend(pairs)
        return [0] * len(pairs)


def test_judge_pairs_swaps_positions_and_maps_answers_back():
    judge = AlwaysFirst()
    pairs = [(f"a{i}", f"b{i}") for i in range(200)]
    answers = judge_pairs(judge, ["p"] * 200, pairs, shuffle_order=True, rng=random.Random(0))
    swapped = [shown != orig for shown, orig in zip(judge.seen, pairs)]
    # a swapped pair was shown as (b, a); the judge's 0 means b, which is 1 in caller order
    assert answers == [1 if s else 0 for s in swapped]
    assert 70 < sum(swapped) < 130  # about half
    assert judge_pairs(AlwaysFirst(), ["p"] * 5, pairs[:5], shuffle_order=False, rng=random.Random(0)) == [0] * 5


def test_judge_pairs_keeps_ties():
    class Undecided:
        def judge(self, prompts, pairs):
            return [-1] * len(pairs)

    assert judge_pairs(Undecided(), ["p"] * 8, [("a", "b")] * 8, shuffle_order=True, rng=random.Random(1)) == [-1] * 8


# module-level so `module:function` specs can import them
def length_reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def flag_reward(prompts, completions, flag=None, **kwargs):
    return [None if f is None else (1.0 if f else 0.0) for f in flag]


def short_reward(prompts, completions, **kwargs):
    return [0.0]


def test_reward_functions_weighted_with_missing_eos_penalty():
    sources = RewardSources([f"{__name__}:length_reward", f"{__name__}:flag_reward"], [0.5, 2.0],
                            ScoringConfig(), max_length=64)
    total, means = sources.score(["p"] * 4, ["ab", "abcd", "", "x"], [[1], [2], [3], [4]],
                                 eos=[True, False, True, False], missing_eos_penalty=1.5,
                                 flag=[True, False, None, True])
    # per source: length 2,4,0,1 x 0.5; flag 1,0,nan,1 x 2 (None is skipped, TRL's nansum)
    assert total.tolist() == pytest.approx([1 + 2, 2 + 0 - 1.5, 0, 0.5 + 2 - 1.5])
    assert means["rewards/length_reward/mean"] == pytest.approx(7 / 4)
    assert means["rewards/flag_reward/mean"] == pytest.approx(2 / 3)


def test_reward_function_returning_the_wrong_count_names_it():
    sources = RewardSources([f"{__name__}:short_reward"], None, ScoringConfig(), max_length=64)
    with pytest.raises(ValueError, match=r"reward_funcs\[0\] \(short_reward\): returned 1 values for 2"):
        sources.score(["p", "q"], ["a", "b"], [[1], [2]], [True, True])


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_xyz:f", r"reward_funcs\[0\]: cannot import module"),
    (f"{__name__}:missing", r"reward_funcs\[0\]: .* has no attribute 'missing'"),
    ("./no/such/reward-model", r"reward_funcs\[0\]: path does not exist"),
])
def test_bad_reward_sources_fail_before_ray(spec, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        check_reward_sources([spec])


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A reward model (score head seeded, saved) from the tiny causal LM."""
    from rayalign.models.loading import load_reward_model, load_tokenizer

    out = tmp_path_factory.mktemp("rm")
    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_reward_model_source_and_judge_agree_with_the_model(ray_local, reward_model_dir):
    from rayalign.actors.reward import RewardModel, RewardModelConfig

    prompts = ["Reverse: a b c ->"] * 4
    completions = [" c b a", " a b c", " c c c", " x"]
    direct = RewardModel(RewardModelConfig(reward_model_dir)).score(prompts, completions)
    sources = RewardSources([reward_model_dir, f"{__name__}:length_reward"], [2.0, 1.0], ScoringConfig(), 64)
    try:
        total, means = sources.score(prompts, completions, [[1]] * 4, [True] * 4)
    finally:
        sources.shutdown()
    assert total.tolist() == pytest.approx([2 * d + len(c) for d, c in zip(direct, completions)], rel=1e-5)
    name = reward_model_dir.rstrip("/").rsplit("/", 1)[-1]
    assert means[f"rewards/{name}/mean"] == pytest.approx(sum(direct) / 4, rel=1e-5)

    judge, group = build_judge(JudgeConfig(type="reward_model", model_name_or_path=reward_model_dir), max_length=64)
    try:
        pairs = [(completions[0], completions[1]), (completions[2], completions[3]), (completions[1], completions[1])]
        answers = judge.judge(prompts[:3], pairs)
    finally:
        group.shutdown()
    assert answers[0] == (0 if direct[0] > direct[1] else 1)
    assert answers[1] == (0 if direct[2] > direct[3] else 1)
    assert answers[2] == -1  # equal scores: a tie


@pytest.mark.slow
def test_llm_judge_on_a_rollout_actor_parses_every_answer(ray_local, tiny_model_dir):
    cfg = JudgeConfig(type="llm", model_name_or_path=tiny_model_dir, backend="hf", max_new_tokens=6,
                      num_cpus=0.5)
    judge, group = build_judge(cfg, max_length=128)
    try:
        prompts = ["Reverse: a b ->", "Reverse: c d e ->", "Reverse: f ->"]
        pairs = [(" b a", " a b"), (" e d c", " c"), (" f", " g")]
        answers = judge.judge(prompts, pairs)
        rendered = judge.render(prompts[0], *pairs[0])
    finally:
        group.shutdown()
    # the untrained tiny model answers gibberish: each answer is what the parser reads from
    # the raw text (mostly "no answer" -> a tie), never an exception or an out-of-range value
    assert len(judge.last_raw) == 3 and all(isinstance(t, str) for t in judge.last_raw)
    assert answers == [-1 if (v := parse_judgment(t)) is None else v for t in judge.last_raw]
    text = rendered[0]["content"] if isinstance(rendered, list) else rendered
    assert "Reverse: a b ->" in text and "Response 0:  b a" in text and "Response 1:  a b" in text
    assert not math.isnan(sum(answers))
