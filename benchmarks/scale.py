"""The realistic-scale benchmark setup: a ~16M-parameter Llama with a locally trained 8k
byte-level BPE vocabulary (untied lm_head), and long-tailed, length-skewed preference data.

    python scale.py OUT_DIR      # writes OUT_DIR/model, OUT_DIR/pref.jsonl, OUT_DIR/prompts.jsonl

Data are synthetic: Zipf-distributed pseudo-words in sentences, in the implicit-prompt format
of Anthropic hh-rlhf ({"chosen", "rejected"}, both starting with the same "\\n\\nHuman: ...
\\n\\nAssistant:" prefix). Answer lengths are log-normal, so chosen sequences come out at about
p50 120 / p90 300 tokens with a tail past 500 (printed by `length_stats`).
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

HIDDEN, LAYERS, HEADS, FFN, VOCAB = 384, 6, 6, 1024, 8192


def _lexicon(rng: random.Random, n: int = 4000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "qu", "ng"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    return sorted(words)


class TextGen:
    """Zipf-weighted words in sentences of 6-18 words."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.words = _lexicon(self.rng)
        self.weights = [1.0 / (i + 1) for i in range(len(self.words))]

    def sentence(self) -> str:
        n = self.rng.randint(6, 18)
        ws = self.rng.choices(self.words, self.weights, k=n)
        return ws[0].capitalize() + " " + " ".join(ws[1:]) + self.rng.choice([".", ".", ".", "?", "!"])

    def words_about(self, n_words: int) -> str:
        out, count = [], 0
        while count < n_words:
            s = self.sentence()
            out.append(s)
            count += len(s.split())
        return " ".join(out)

    def lognormal_words(self, median: float, sigma: float, cap: int) -> int:
        return max(3, min(cap, int(math.exp(math.log(median) + sigma * self.rng.gauss(0, 1)))))


def write_data(out_dir, n_pairs: int = 200, n_prompts: int = 256, seed: int = 0) -> tuple[Path, Path]:
    gen = TextGen(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pref, prompts = out / "pref.jsonl", out / "prompts.jsonl"
    with open(pref, "w") as f:
        for _ in range(n_pairs):
            question = gen.words_about(gen.lognormal_words(10, 0.5, 50))
            prefix = f"\n\nHuman: {question}\n\nAssistant:"
            chosen = gen.words_about(gen.lognormal_words(21, 1.25, 240))
            rejected = gen.words_about(gen.lognormal_words(19, 1.25, 240))
            f.write(json.dumps({"chosen": f"{prefix} {chosen}", "rejected": f"{prefix} {rejected}"}) + "\n")
    with open(prompts, "w") as f:
        for _ in range(n_prompts):
            f.write(json.dumps({"prompt": f"\n\nHuman: {gen.words_about(gen.lognormal_words(10, 0.5, 50))}"
                                          f"\n\nAssistant:"}) + "\n")
    return pref, prompts


TARGET_WORDS = 30


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """The online-DPO benchmark's reward (TRL's reward-function signature): how close a
    completion's word count is to TARGET_WORDS. Cheap and deterministic, so the benchmark
    times sampling and training, not scoring."""
    return [-abs(len(c.split()) - TARGET_WORDS) / TARGET_WORDS for c in completions]


def build_model(out_dir, seed: int = 0, vocab: int = VOCAB) -> Path:
    from rayalign.models.tiny import build_tiny_model

    gen = TextGen(seed + 1)
    corpus = [gen.words_about(60) for _ in range(3000)] + ["\n\nHuman: ", "\n\nAssistant: "] * 200
    return build_tiny_model(out_dir, corpus, seed=seed, vocab_size=vocab, hidden_size=HIDDEN,
                            num_layers=LAYERS, num_heads=HEADS, intermediate_size=FFN,
                            max_position_embeddings=1024, tie_word_embeddings=False)


def length_stats(model_dir, pref_file) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = sorted(len(tok(json.loads(line)["chosen"]).input_ids) for line in open(pref_file))
    q = lambda p: lengths[min(len(lengths) - 1, int(p * len(lengths)))]  # noqa: E731
    return {"p50": q(0.5), "p90": q(0.9), "max": lengths[-1], "n": len(lengths)}


def num_params(model_dir) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        return sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                   else math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    root = Path(sys.argv[1])
    model = build_model(root / "model")
    pref, _ = write_data(root)
    print(json.dumps({"params": num_params(model), "chosen_tokens": length_stats(model, pref)}))
