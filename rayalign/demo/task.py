"""The demo task: reverse a short sequence of letters — small, learnable, checkable.

    prompt:     "Reverse: c a f b ->"
    completion: " b f a c"     (standard format: a leading space, as prompt + completion is one text)

The demo model (`build_demo_model(size="small")`, 1.1M parameters) learns it completely from
clean demonstrations in 400 SFT steps. The demo's SFT stage instead learns from sloppy ones,
as real SFT data often is: `sft_train_sloppy.jsonl` is `sft_train.jsonl` where 60% of the
answers to long inputs (7-9 letters) leave off the last letter. The SFT model imitates that
and leaves the last letter off most long answers; the preference pairs and the reward know
better, which is the headroom DPO and online DPO are shown to use. `write_demo_data` writes
(seeded, deterministic):

    sft_train.jsonl / sft_eval.jsonl                         {"prompt", "completion"}
    sft_train_sloppy.jsonl                                   the same problems, sloppy answers
    sft_train_conversational.jsonl                           message lists
    pref_train.jsonl / pref_eval.jsonl                       {"prompt", "chosen", "rejected"}
    pref_train_conversational.jsonl / pref_eval_conversational.jsonl
    pref_train_implicit.jsonl                                {"chosen", "rejected"} hh-rlhf style
    prompts_train.jsonl / prompts_eval.jsonl                 {"prompt"}
    prompts_train_conversational.jsonl / prompts_eval_conversational.jsonl
    manifest.json                                            the files and their row counts

Chosen completions are correct; rejected ones are plausible mistakes (the input copied
unreversed, two neighbours swapped, a letter dropped or replaced). `build_demo_model` builds
the tiny model (the tests' default, 2 layers of width 64: capacity-bound near 0.6 correctness)
or the demo's small one, each with a tokenizer trained on the task's text.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

LETTERS = "abcdefghijkl"
MIN_LEN, MAX_LEN = 4, 9
PROMPT_PREFIX = "Reverse:"
# The sloppy demonstrations: this share of the answers to inputs of SLOPPY_MIN_LEN letters or
# more leave off the last letter (above one half, so the SFT model's greedy answer does too).
SLOPPY_MIN_LEN, SLOPPY_RATE = 7, 0.6
# The demo's preference pairs (write_demo_data's default, 2000, keeps the tests' data small; the
# demo's reward stage would see those ~13 times).
DEMO_N_PREF = 8000
# Model sizes (build_tiny_model's arguments): "tiny" is the tests' fast default, "small" the demo's.
MODEL_SIZES = {"tiny": {}, "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4,
                                     "intermediate_size": 512}}


def make_problem(rng: random.Random) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN))]


def prompt_text(letters: Sequence[str]) -> str:
    # The arrow marks where the answer starts (the letters alone would not).
    return f"{PROMPT_PREFIX} {' '.join(letters)} ->"


def answer_text(letters: Sequence[str]) -> str:
    return " ".join(reversed(letters))


def wrong_answer(letters: Sequence[str], rng: random.Random) -> str:
    """A plausible wrong answer, never equal to the correct one."""
    correct = list(reversed(letters))
    for _ in range(20):
        kind = rng.choice(["copy", "swap", "drop", "replace", "partial"])
        out = list(correct)
        if kind == "copy":
            out = list(letters)
        elif kind == "swap":
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
        elif kind == "drop":
            del out[rng.randrange(len(out))]
        elif kind == "replace":
            i = rng.randrange(len(out))
            out[i] = rng.choice([c for c in LETTERS if c != out[i]])
        else:  # reversed only the first half
            half = len(letters) // 2
            out = list(reversed(letters[:half])) + list(letters[half:])
        if out != correct:
            return " ".join(out)
    out = list(correct)
    out[0] = next(c for c in LETTERS if c != out[0])
    return " ".join(out)


def sloppy_answer(letters: Sequence[str], rng: random.Random) -> str:
    """A sloppy annotator's answer: for long inputs, often the reversal without its last letter."""
    answer = list(reversed(letters))
    if len(letters) >= SLOPPY_MIN_LEN and rng.random() < SLOPPY_RATE:
        answer = answer[:-1]
    return " ".join(answer)


def _problems(seed: int, n: int, exclude: set[str] | None = None) -> list[list[str]]:
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[list[str]] = []
    while len(out) < n:
        p = make_problem(rng)
        key = "".join(p)
        if key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def write_demo_data(output_dir, *, seed: int = 0, n_sft: int = 4000, n_pref: int = 2000,
                    n_prompts: int = 1000, n_eval: int = 200) -> Path:
    """Write every demo file into `output_dir` (train and eval problems are disjoint)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_problems = _problems(seed * 1000 + 1, n_eval)
    held_out = {"".join(p) for p in eval_problems}
    train_problems = _problems(seed * 1000 + 2, max(n_sft, n_pref, n_prompts), exclude=held_out)
    rng = random.Random(seed * 1000 + 3)
    sloppy_rng = random.Random(seed * 1000 + 4)

    def pref_rows(problems):
        return [(prompt_text(p), answer_text(p), wrong_answer(p, rng)) for p in problems]

    sft_train = [(prompt_text(p), answer_text(p)) for p in train_problems[:n_sft]]
    sft_eval = [(prompt_text(p), answer_text(p)) for p in eval_problems]
    sft_sloppy = [(prompt_text(p), sloppy_answer(p, sloppy_rng)) for p in train_problems[:n_sft]]
    pref_train = pref_rows(train_problems[:n_pref])
    pref_eval = pref_rows(eval_problems)
    # Standard-format completions start with a space: TRL concatenates prompt + completion text.
    files: dict[str, list[dict]] = {
        "sft_train.jsonl": [{"prompt": p, "completion": " " + c} for p, c in sft_train],
        "sft_eval.jsonl": [{"prompt": p, "completion": " " + c} for p, c in sft_eval],
        "sft_train_sloppy.jsonl": [{"prompt": p, "completion": " " + c} for p, c in sft_sloppy],
        "sft_train_conversational.jsonl": [{"prompt": _user(p), "completion": _assistant(c)}
                                           for p, c in sft_train],
        "pref_train.jsonl": [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in pref_train],
        "pref_eval.jsonl": [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in pref_eval],
        "pref_train_conversational.jsonl": [
            {"prompt": _user(p), "chosen": _assistant(c), "rejected": _assistant(r)} for p, c, r in pref_train],
        "pref_eval_conversational.jsonl": [
            {"prompt": _user(p), "chosen": _assistant(c), "rejected": _assistant(r)} for p, c, r in pref_eval],
        "pref_train_implicit.jsonl": [
            {"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}
            for p, c, r in pref_train],
        "prompts_train.jsonl": [{"prompt": prompt_text(p)} for p in train_problems[:n_prompts]],
        "prompts_eval.jsonl": [{"prompt": prompt_text(p)} for p in eval_problems],
        "prompts_train_conversational.jsonl": [{"prompt": _user(prompt_text(p))} for p in train_problems[:n_prompts]],
        "prompts_eval_conversational.jsonl": [{"prompt": _user(prompt_text(p))} for p in eval_problems],
    }
    for name, rows in files.items():
        _write_jsonl(out / name, rows)
    manifest = {"task": "reverse", "seed": seed, "files": {k: len(v) for k, v in files.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Text covering the task's vocabulary (for training the tiny tokenizer)."""
    rng = random.Random(seed + 7)
    lines = []
    for _ in range(n):
        p = make_problem(rng)
        lines.append(f"{prompt_text(p)}\n{answer_text(p)}")
        lines.append(f"\n\nHuman: {prompt_text(p)}\n\nAssistant: {wrong_answer(p, rng)}")
    return lines


def build_demo_model(output_dir, *, seed: int = 0, size: str = "tiny") -> Path:
    """The tiny model (rayalign/models/tiny.py) at one of MODEL_SIZES, with its tokenizer
    trained on this task's text."""
    from rayalign.models.tiny import build_tiny_model

    if size not in MODEL_SIZES:
        raise ValueError(f"size: {size!r} is not one of {sorted(MODEL_SIZES)}")
    return build_tiny_model(output_dir, corpus(seed), seed=seed, **MODEL_SIZES[size])


# ---------------------------------------------------------------------------- checking

_PROMPT_RE = re.compile(rf"{re.escape(PROMPT_PREFIX)}\s*((?:[{LETTERS}]\s*)+)")


def _prompt_string(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):  # conversational: the last user message
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt)


def _completion_string(completion: Any) -> str:
    if isinstance(completion, (list, tuple)):
        return " ".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def parse_problem(prompt: Any) -> list[str] | None:
    """The letters of a prompt (standard string or message list), or None if malformed."""
    matches = _PROMPT_RE.findall(_prompt_string(prompt))
    if not matches:
        return None
    return matches[-1].split()


def check_answer(prompt: Any, completion: Any) -> bool:
    """True when the completion is exactly the reversed letters (whitespace-tolerant)."""
    letters = parse_problem(prompt)
    if letters is None:
        return False
    return _completion_string(completion).split() == list(reversed(letters))


def check_answers(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[bool]:
    """`check_answer` over a batch: the eval job's `checker` (called like a reward function,
    with the dataset's other columns as keyword arguments, which it ignores)."""
    return [check_answer(p, c) for p, c in zip(prompts, completions)]


def correctness(prompts: Sequence[Any], completions: Sequence[Any]) -> float:
    """Fraction of completions that solve their prompt."""
    if not prompts:
        return 0.0
    return sum(check_answer(p, c) for p, c in zip(prompts, completions)) / len(prompts)


def demo_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
    """Rule-based reward: 1 for a correct answer, else partial credit for letters in the
    right place minus a length penalty; junk scores below any partial answer."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        letters = parse_problem(prompt)
        tokens = _completion_string(completion).split()
        if letters is None:
            rewards.append(-1.0)
            continue
        target = list(reversed(letters))
        if tokens == target:
            rewards.append(1.0)
            continue
        hits = sum(a == b for a, b in zip(tokens, target)) / len(target)
        junk = sum(t not in LETTERS for t in tokens) / max(len(tokens), 1)
        length_gap = abs(len(tokens) - len(target)) / len(target)
        rewards.append(0.8 * hits - 0.2 * min(length_gap, 1.0) - 0.5 * junk)
    return rewards


def exact_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float]:
    """1 for a correct answer, 0 otherwise: the checker as a reward, no partial credit."""
    return [float(ok) for ok in check_answers(prompts, completions)]
