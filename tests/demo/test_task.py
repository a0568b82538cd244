"""The demo task: deterministic files, every format, a checker chosen passes and rejected fails."""

import json
from pathlib import Path

from rayalign.demo.task import check_answer, correctness, demo_reward, exact_reward, write_demo_data


def rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_files_formats_and_determinism(tmp_path, demo_data_dir):
    manifest = json.loads(Path(demo_data_dir, "manifest.json").read_text())
    for name, n in manifest["files"].items():
        assert len(rows(Path(demo_data_dir, name))) == n > 0
    again = write_demo_data(tmp_path, seed=0)
    for name in manifest["files"]:
        assert Path(again, name).read_text() == Path(demo_data_dir, name).read_text()
    train = {r["prompt"] for r in rows(Path(demo_data_dir, "prompts_train.jsonl"))}
    held = {r["prompt"] for r in rows(Path(demo_data_dir, "prompts_eval.jsonl"))}
    assert not train & held


def test_chosen_correct_rejected_wrong_in_every_format(demo_data_dir):
    for name in ("pref_train.jsonl", "pref_eval.jsonl", "pref_train_conversational.jsonl"):
        for r in rows(Path(demo_data_dir, name)):
            assert check_answer(r["prompt"], r["chosen"]) and not check_answer(r["prompt"], r["rejected"])
    for r in rows(Path(demo_data_dir, "pref_train_implicit.jsonl"))[:50]:
        prompt, answer = r["chosen"].rsplit("Assistant:", 1)
        assert check_answer(prompt, answer)


def test_reward_orders_answers():
    p = "Reverse: a b c ->"
    correct, close, junk = demo_reward([p] * 3, [" c b a", " c a b", "???"])
    assert correct == 1.0 > close > junk
    assert correctness([p, [{"role": "user", "content": p}]], ["  c b a ", [{"role": "assistant", "content": "c b a"}]]) == 1.0


def test_exact_reward_gives_no_partial_credit():
    p = "Reverse: a b c ->"
    assert exact_reward([p] * 3, [" c b a", " c a b", "c b a"]) == [1.0, 0.0, 1.0]


def test_sloppy_demonstrations_drop_the_last_letter_of_long_answers_only(demo_data_dir):
    from rayalign.demo.task import SLOPPY_MIN_LEN, SLOPPY_RATE, parse_problem

    clean = rows(Path(demo_data_dir, "sft_train.jsonl"))
    sloppy = rows(Path(demo_data_dir, "sft_train_sloppy.jsonl"))
    assert [r["prompt"] for r in clean] == [r["prompt"] for r in sloppy]
    dropped = long = 0
    for c, s in zip(clean, sloppy):
        if len(parse_problem(c["prompt"])) < SLOPPY_MIN_LEN:
            assert s == c
            continue
        long += 1
        if s != c:
            assert s["completion"] == c["completion"][:-2]  # " ... x" without " x"
            dropped += 1
    assert long > 1000 and abs(dropped / long - SLOPPY_RATE) < 0.04, (dropped, long)
