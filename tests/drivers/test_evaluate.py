"""The eval job: win rates and intervals against hand-computed values, position swaps that
cancel a biased judge, config errors naming the field, and `rayalign eval` on a real local
Ray over two tiny checkpoints (checker, reward model, reward-model and LLM judges; HF and vLLM)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import rayalign
from rayalign import checkpoint as ckpt
from rayalign.config import ConfigError, EvalConfig, from_dict
from rayalign.demo.task import check_answers
from rayalign.evaluation import (balanced_swaps, expand_models, judge_swapped, mean_interval, outcome_score,
                                 wilson_interval, win_rate)
from rayalign.models.loading import load_causal_lm
from rayalign.rewards.judges import parse_judgment

# ----------------------------------------------------------------------------- statistics


def test_wilson_interval_matches_hand_computed_values():
    # 6 wins, 2 ties, 2 losses: p = 7/10. By hand with z = 1.959964 (z² = 3.841459):
    # center = (0.7 + 0.192073) / 1.384146 = 0.644494; half = z·sqrt(0.021 + 0.009604) / 1.384146 = 0.247715
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.396778, abs=1e-5) and hi == pytest.approx(0.892209, abs=1e-5)
    # 0 of 10: the textbook upper bound 0.2775 (z²/(n + z²)), lower exactly 0
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.841459 / 13.841459, abs=1e-6))
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(3, 0) is None

    result = win_rate([0] * 6 + [-1] * 2 + [1] * 2)
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (6, 2, 2, 10)
    assert result["value"] == pytest.approx(0.7) and result["ci95"] == pytest.approx((0.396778, 0.892209), abs=1e-5)
    assert [outcome_score(a) for a in (0, -1, 1)] == [1.0, 0.5, 0.0]


def test_mean_interval_wilson_for_pass_rates_normal_for_scores():
    binary = mean_interval([1, 0, 1, 1, 1, 0, 1, 1, 0, 1.0])
    assert binary["mean"] == 0.7 and binary["ci95"] == pytest.approx((0.396778, 0.892209), abs=1e-5)
    # 1, 2, 3, 4: s = sqrt(5/3) = 1.290994; half = 1.959964 · 1.290994 / 2 = 1.265149
    scores = mean_interval([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert scores["n"] == 4 and scores["mean"] == 2.5
    assert scores["ci95"] == pytest.approx((2.5 - 1.265149, 2.5 + 1.265149), abs=1e-5)


# ----------------------------------------------------------------------------- position swaps


class AlwaysFirst:
    """A judge with total position bias: whatever is shown first wins."""

    def judge(self, prompts, pairs):
        return [0] * len(pairs)


class PrefersLonger:
    """A position-free judge: the longer response wins, equal lengths tie."""

    def judge(self, prompts, pairs):
        return [0 if len(a) > len(b) else 1 if len(b) > len(a) else -1 for a, b in pairs]


def test_balanced_swaps_are_exactly_half_and_seeded():
    for n in (1, 2, 7, 40, 101):
        assert sum(balanced_swaps(n, seed=3)) == n // 2
    assert balanced_swaps(40, seed=3) == balanced_swaps(40, seed=3) != balanced_swaps(40, seed=4)


def test_position_biased_judge_scores_exactly_half():
    pairs = [(f"model {i}", f"baseline {i}") for i in range(40)]
    swapped = balanced_swaps(len(pairs), seed=0)
    answers, given = judge_swapped(AlwaysFirst(), ["p"] * 40, pairs, swapped)
    result = win_rate(answers, given)
    assert result["value"] == 0.5 and (result["wins"], result["losses"], result["ties"]) == (20, 20, 0)
    assert result["first_position_rate"] == 1.0  # the bias shows in the diagnostic, not the win rate
    assert answers == [1 if s else 0 for s in swapped]

    # unbalanced swapping would not cancel it: with no swaps the same judge "wins" every time
    assert win_rate(judge_swapped(AlwaysFirst(), ["p"] * 40, pairs, [False] * 40)[0])["value"] == 1.0


def test_swapped_answers_are_mapped_back():
    pairs = [("a much longer answer", "short")] * 10 + [("tiny", "a longer baseline")] * 6 + [("same", "same")] * 4
    answers, given = judge_swapped(PrefersLonger(), ["p"] * 20, pairs, balanced_swaps(20, seed=1))
    assert answers == [0] * 10 + [1] * 6 + [-1] * 4
    assert given != answers  # the judge saw half of them the other way round
    assert win_rate(answers)["value"] == pytest.approx((10 + 0.5 * 4) / 20)


# ----------------------------------------------------------------------------- config

BASE = {"models": ["m"], "eval_dataset": "d.jsonl", "checker": "rayalign.demo.task:check_answers"}
JUDGE = {"type": "reward_model", "model_name_or_path": "rm"}


@pytest.mark.parametrize("change, field", [
    ({"models": []}, "models"),
    ({"models": [{"name": "x"}]}, "models[0].path"),
    ({"models": [{"path": "m", "size": 3}]}, "models[0]"),
    ({"models": [{"path": "m", "x": "big"}]}, "models[0].x"),
    ({"models": [3]}, "models[0]"),
    ({"eval_dataset": ""}, "eval_dataset"),
    ({"limit": 0}, "limit"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": 4}, "num_samples"),  # greedy samples would all be the same
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),  # 0 and -1 both mean off (TRL / vLLM)
    ({"min_p": 2.0}, "min_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"checker": "no_colon"}, "checker"),
    ({"checker": None}, "checker"),  # nothing would be scored
    ({"baseline": "reference"}, "baseline"),  # a baseline without a judge
    ({"judge": JUDGE}, "judge"),  # a judge without a baseline
    ({"judge": {**JUDGE, "type": "oracle"}, "baseline": "reference"}, "judge.type"),
    ({"rollout": {"backend": "tgi"}}, "rollout.backend"),
    ({"num_sample": 2}, "num_sample"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        from_dict(EvalConfig, {**BASE, **change})
    assert str(err.value).startswith(f"{field}:"), str(err.value)


def test_config_defaults_and_model_entries():
    cfg = from_dict(EvalConfig, {**BASE, "models": ["a=x", {"path": "y", "name": "b", "x": 7}], "judge": JUDGE,
                                 "baseline": "reference"})
    assert cfg.temperature == 0.0 and cfg.num_samples == 1 and cfg.judge.shuffle_order
    assert cfg.models == ("a=x", {"path": "y", "name": "b", "x": 7})


def _save_model(model, tokenizer_dir: str, out: Path) -> None:
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).glob("*"):
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)


def test_expand_models_orders_a_run_by_step(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    for step in (20, 5, 100):
        ckpt.commit_checkpoint(tiny_model_dir, str(run), f"checkpoint-{step}", step=step)
    (run / "checkpoint-7").mkdir()  # an incomplete save (no marker) is skipped
    specs = expand_models([f"base={tiny_model_dir}", str(run), {"path": tiny_model_dir, "name": "big", "x": 1e9}])
    assert [(m.name, m.x) for m in specs] == [("base", None), ("run@5", 5.0), ("run@20", 20.0), ("run@100", 100.0),
                                              ("big", 1e9)]
    assert specs[2].path == f"{run}/checkpoint-20"
    with pytest.raises(ConfigError, match=r"models: labels \['dup'\]"):
        expand_models([f"dup={tiny_model_dir}", f"dup={tiny_model_dir}"])
    with pytest.raises(ValueError, match=r"models\[1\]: path does not exist"):
        expand_models([tiny_model_dir, "./no/such/model"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"models\[0\]: .* neither a model dir"):
        expand_models([str(tmp_path / "empty")])


# ----------------------------------------------------------------------------- the job on Ray


def _sft(model_dir: str, data_dir: str, steps: list[int], seed: int = 0) -> dict[int, dict]:
    """A few hundred plain SFT steps in process (seconds), the weights at each of `steps`:
    checkpoints that differ in skill, made without the training stack (not under test here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded 2-core machine 2 threads run ~25x slower than 1
    try:
        return _sft_steps(model_dir, data_dir, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _sft_steps(model_dir: str, data_dir: str, steps: list[int], seed: int) -> dict[int, dict]:
    from rayalign.data import prompt_text_and_ids
    from rayalign.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    rows = [json.loads(x) for x in Path(data_dir, "sft_train.jsonl").read_text().splitlines()]
    data = [(prompt_text_and_ids(r["prompt"], tok)[1],
             tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    snapshots = {}
    for step in range(1, max(steps) + 1):
        batch = [data[i] for i in torch.randint(len(data), (32,), generator=gen).tolist()]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((32, width), tok.pad_token_id)
        labels = torch.full((32, width), -100)
        mask = torch.zeros((32, width), dtype=torch.long)
        for k, (p, c) in enumerate(batch):
            ids[k, :len(p) + len(c)] = torch.tensor(p + c)
            mask[k, :len(p) + len(c)] = 1
            labels[k, len(p):len(p) + len(c)] = torch.tensor(c)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in steps:
            snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return snapshots


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, demo_data_dir, tmp_path_factory) -> str:
    """A run dir with checkpoint-150 and checkpoint-300 (committed with completion markers)."""
    root = tmp_path_factory.mktemp("eval-run")
    run = root / "run"
    model = load_causal_lm(tiny_model_dir)
    for step, state in _sft(tiny_model_dir, demo_data_dir, [150, 300]).items():
        model.load_state_dict(state)
        staging = root / f"staging-{step}"
        _save_model(model, tiny_model_dir, staging)
        ckpt.commit_checkpoint(str(staging), str(run), f"checkpoint-{step}", step=step)
    return str(run)


@pytest.fixture(scope="module")
def reward_model_dir(run_dir, tmp_path_factory) -> str:
    """A reward model (the 300-step checkpoint with a seeded score head), saved so that every
    actor that loads it scores alike."""
    from rayalign.models.loading import load_reward_model, load_tokenizer

    src = f"{run_dir}/checkpoint-300"
    torch.manual_seed(0)
    model = load_reward_model(src, pad_token_id=load_tokenizer(src).pad_token_id)
    out = tmp_path_factory.mktemp("eval-rm")
    _save_model(model, src, out)
    return str(out)


def rows(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


LIMIT = 24
COMMON = {"max_new_tokens": 16, "max_length": 64, "logging": {"progress_bar": False, "report_to": []},
          "scoring": {"num_cpus_per_actor": 0.5}}


@pytest.fixture(scope="module")
def hf_eval(ray_local, run_dir, reward_model_dir, demo_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-hf")
    summary = rayalign.evaluate({
        **COMMON, "models": [run_dir], "eval_dataset": f"{demo_data_dir}/sft_eval.jsonl", "limit": LIMIT,
        "output_dir": str(out), "checker": "rayalign.demo.task:check_answers", "reward_model_path": reward_model_dir,
        "baseline": "reference", "judge": {"type": "reward_model", "model_name_or_path": reward_model_dir,
                                           "num_cpus": 0.5},
        "rollout": {"backend": "hf", "num_actors": 2, "num_cpus_per_actor": 0.5}})
    return summary, out


@pytest.mark.slow
def test_eval_job_writes_completions_summary_and_plot(hf_eval, demo_data_dir):
    summary, out = hf_eval
    table = rows(out / "completions.jsonl")
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m["name"] for m in summary["models"]] == ["run@150", "run@300"]  # a run dir, ordered by step
    assert [m["x"] for m in summary["models"]] == [150.0, 300.0]

    data = rows(Path(demo_data_dir, "sft_eval.jsonl"))[:LIMIT]
    assert len(table) == 2 * LIMIT
    for model in summary["models"]:
        mine = [r for r in table if r["model"] == model["name"]]
        assert [r["prompt_index"] for r in mine] == list(range(LIMIT))
        assert [r["prompt"] for r in mine] == [d["prompt"] for d in data]
        assert [r["baseline_completion"] for r in mine] == [d["completion"] for d in data]
        for r in mine:
            assert {"completion", "judgment", "score", "checker", "reward"} <= set(r)
        # the pass rate is what the checker gives on the written completions
        recomputed = check_answers([r["prompt"] for r in mine], [r["completion"] for r in mine])
        assert [r["checker"] for r in mine] == [float(v) for v in recomputed]
        assert model["checker"]["mean"] == pytest.approx(sum(recomputed) / LIMIT)
        assert model["checker"]["ci95"][0] <= model["checker"]["mean"] <= model["checker"]["ci95"][1]
        assert model["reward"]["mean"] == pytest.approx(sum(r["reward"] for r in mine) / LIMIT)

        # the judge and the scorer are the same reward model: each verdict must follow the
        # scores, whichever way round the pair was shown
        wr = model["win_rate"]
        assert wr["n"] == LIMIT and wr["swapped"] == LIMIT // 2
        assert sum(r["judgment"]["swapped"] for r in mine) == LIMIT // 2
        for r in mine:
            diff = r["reward"] - r["baseline_reward"]
            expected = "model" if diff > 1e-5 else "baseline" if diff < -1e-5 else r["judgment"]["winner"]
            assert r["judgment"]["winner"] == expected, r
            assert r["score"] == {"model": 1.0, "tie": 0.5, "baseline": 0.0}[r["judgment"]["winner"]]
        counts = [sum(r["judgment"]["winner"] == w for r in mine) for w in ("model", "tie", "baseline")]
        assert [wr["wins"], wr["ties"], wr["losses"]] == counts
        assert wr["value"] == pytest.approx(sum(r["score"] for r in mine) / LIMIT)
        assert wr["ci95"][0] <= wr["value"] <= wr["ci95"][1]
    # the reference answers all pass the checker; training raised the pass rate
    assert summary["baseline_scores"]["checker"]["mean"] == 1.0
    first, last = (m["checker"]["mean"] for m in summary["models"])
    assert last > first and last >= 0.2, (first, last)
    metrics = rows(out / "metrics.jsonl")
    assert [m["x"] for m in metrics] == [150.0, 300.0] and metrics[1]["checker"] == last


@pytest.mark.slow
def test_eval_cli_llm_judge_against_a_model_baseline(ray_local, run_dir, tiny_model_dir, demo_data_dir, tmp_path):
    from rayalign.cli import main

    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        **COMMON, "models": [f"init={tiny_model_dir}"], "baseline": f"{run_dir}/checkpoint-300",
        "eval_dataset": f"{demo_data_dir}/prompts_eval_conversational.jsonl", "output_dir": str(tmp_path / "out"),
        "checker": "rayalign.demo.task:check_answers", "num_samples": 2, "temperature": 1.0,
        "judge": {"type": "llm", "model_name_or_path": tiny_model_dir, "backend": "hf", "num_cpus": 0.5,
                  "max_new_tokens": 4},
        "rollout": {"backend": "hf", "num_cpus_per_actor": 0.5}}))
    assert main(["eval", "--config", str(config), "--limit", "6", "--seed", "3"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    table = rows(tmp_path / "out" / "completions.jsonl")
    assert len(table) == 12 and [r["sample"] for r in table[:4]] == [0, 1, 0, 1]
    assert summary["models"][0]["name"] == "init" and summary["models"][0]["x"] is None
    wr = summary["models"][0]["win_rate"]
    assert wr["n"] == 12 and wr["swapped"] == 6
    for r in table:
        j = r["judgment"]
        parsed = parse_judgment(j["raw"])  # unreadable answers count as ties
        assert j["answer"] == (-1 if parsed is None else parsed)
        expected = "tie" if parsed is None else ("model", "baseline")[parsed ^ j["swapped"]]
        assert j["winner"] == expected, j
        assert r["prompt"][0]["role"] == "user"
    assert wr["ties"] == sum(parse_judgment(r["judgment"]["raw"]) is None for r in table)
    # the baseline's completions were sampled from the checkpoint and checked like the models'
    recheck = check_answers([r["prompt"] for r in table], [r["baseline_completion"] for r in table])
    assert [r["baseline_checker"] for r in table] == [float(v) for v in recheck]
    assert summary["baseline_scores"]["checker"]["mean"] == pytest.approx(sum(recheck) / 12)


@pytest.mark.slow
@pytest.mark.vllm
def test_eval_with_vllm_matches_hf(hf_eval, run_dir, demo_data_dir, tmp_path):
    summary = rayalign.evaluate({
        **COMMON, "models": [f"run@300={run_dir}/checkpoint-300"], "eval_dataset": f"{demo_data_dir}/sft_eval.jsonl",
        "limit": LIMIT, "output_dir": str(tmp_path), "checker": "rayalign.demo.task:check_answers",
        "rollout": {"backend": "vllm", "num_cpus_per_actor": 0.5}})
    assert summary["backend"] == "vllm"
    hf = [r for r in rows(hf_eval[1] / "completions.jsonl") if r["model"] == "run@300"]
    vl = rows(tmp_path / "completions.jsonl")
    same = sum(a["completion"] == b["completion"] for a, b in zip(hf, vl))
    assert same >= LIMIT - 1, [(a["completion"], b["completion"]) for a, b in zip(hf, vl)]
    hf_rate = next(m for m in hf_eval[0]["models"] if m["name"] == "run@300")["checker"]["mean"]
    assert abs(summary["models"][0]["checker"]["mean"] - hf_rate) <= 1 / LIMIT
