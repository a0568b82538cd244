"""Peak memory of one DPO step with a 150k vocabulary: TRL 1.16 DPOTrainer vs rayalign.

    cd benchmarks && ../.venv/bin/python bench_memory.py [--pairs 4] [--json out.json]

A config-initialised Qwen2-shaped model (vocabulary 151936, hidden 256, 2 layers, tied
embeddings, ~39M parameters, nearly all of them the embedding), the realistic-scale
benchmark's preference data (scale.py; its 8k tokenizer's ids are valid in the larger
vocabulary), max_length 384, 4 pairs. Each side runs in a fresh subprocess: load policy and
reference, then one step — the reference forward, the policy forward, the DPO loss and its
backward — and reports the process's peak RSS above what it held before the step. TRL:
`DPOTrainer.compute_loss` on its own collated batch. rayalign: `DPO.loss`, the learner's
objective (padding-free and the completion-only chunked lm_head, the defaults).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB, MAX_LENGTH = 151936, 384


def build(d: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import scale

    scale.build_model(d / "tok")  # the tokenizer (and a model we do not use)
    scale.write_data(d, n_pairs=16)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=1024, pad_token_id=2, eos_token_id=1, bos_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(d / "model")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(d / "tok").save_pretrained(d / "model")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trl_step(d: Path, pairs: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in open(d / "pref.jsonl")][:pairs]
    args = DPOConfig(output_dir=str(d / "trl"), use_cpu=True, report_to="none", per_device_train_batch_size=pairs,
                     max_length=MAX_LENGTH, bf16=False, gradient_checkpointing=False)  # fp32 on both sides
    trainer = DPOTrainer(AutoModelForCausalLM.from_pretrained(d / "model"),
                         ref_model=AutoModelForCausalLM.from_pretrained(d / "model"), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(d / "model"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)])
    before = peak_mib()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return {"peak_above_start_mib": peak_mib() - before, "loss": float(loss),
            "tokens": int(batch["attention_mask"].sum())}


def rayalign_step(d: Path, pairs: int) -> dict:
    from transformers import AutoModelForCausalLM

    from rayalign.config import DPOConfig
    from rayalign.config.loading import from_dict
    from rayalign.data import TokenizeSettings, normalize_preference_row, tokenize_preference_row
    from rayalign.models.loading import load_tokenizer
    from rayalign.objectives import DPO, reference_logprobs

    tok = load_tokenizer(str(d / "model"))
    settings = TokenizeSettings(max_length=MAX_LENGTH)
    rows = [tokenize_preference_row(normalize_preference_row(json.loads(x), "pref", i), tok, settings)
            for i, x in enumerate(open(d / "pref.jsonl")) if i < pairs]
    cfg = from_dict(DPOConfig, {"model_name_or_path": str(d / "model"), "train_dataset": "x",
                                "max_length": MAX_LENGTH})
    policy = AutoModelForCausalLM.from_pretrained(d / "model")
    reference = AutoModelForCausalLM.from_pretrained(d / "model").eval()
    objective = DPO(cfg)
    batch, _ = objective.collate(rows, tok.pad_token_id)
    before = peak_mib()
    batch = batch.with_reference(*reference_logprobs(reference, batch, cfg))
    loss, _ = objective.loss(policy, batch)
    loss.backward()
    return {"peak_above_start_mib": peak_mib() - before, "loss": float(loss),
            "tokens": int(batch.attention_mask.sum())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--json", default=str(HERE / "bench_memory.json"))
    p.add_argument("--worker")
    p.add_argument("--dir")
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(2)
        out = (trl_step if a.worker == "trl" else rayalign_step)(Path(a.dir), a.pairs)
        print("RESULT " + json.dumps(out))
        return
    d = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    build(d)
    results = {}
    for side in ("trl", "rayalign"):
        proc = subprocess.run([sys.executable, __file__, "--worker", side, "--dir", str(d), "--pairs", str(a.pairs)],
                              cwd=HERE, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{side}: failed rc={proc.returncode}\n{proc.stderr[-3000:]}")
            continue
        results[side] = json.loads(lines[-1][7:])
        print(side, results[side], flush=True)
    full_logits = results.get("trl", {}).get("tokens", 0) * VOCAB * 4 / 2**20
    summary = {"vocab": VOCAB, "pairs": a.pairs, "max_length": MAX_LENGTH, "results": results,
               "one_fp32_logits_block_of_the_real_tokens_mib": round(full_logits)}
    print(json.dumps(summary, indent=2))
    Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
