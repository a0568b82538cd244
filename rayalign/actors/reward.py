"""RewardModel: a scoring actor around a saved `AutoModelForSequenceClassification`.

`score(prompts, completions)` returns one float per pair: the prompt (standard text, or a
message list through the chat template) is followed by the completion exactly as the reward
job tokenized its training rows (eos appended to standard completions), so a model scores
what it was trained on. Online DPO uses these actors (several, weighted) to rank samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayalign.actors.compute import on_compute_thread, use_threads
from rayalign.batch import pad_sequences
from rayalign.data import DataError, TokenizeSettings, normalize_sft_row, tokenize_sft_row
from rayalign.models.loading import load_reward_model, load_tokenizer


@dataclass(frozen=True)
class RewardModelConfig:
    """One reward model: where it is and how to batch it."""

    model_name_or_path: str
    batch_size: int = 32
    max_length: int | None = 1024
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    trust_remote_code: bool = False


class RewardModel:
    """Scores (prompt, completion) pairs with one reward model."""

    @on_compute_thread
    def __init__(self, cfg: RewardModelConfig, *, rank: int = 0, world_size: int = 1):
        use_threads(self, max(1, int(cfg.num_cpus)))
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code,
                                        field="reward.model_name_or_path")
        self.model = load_reward_model(cfg.model_name_or_path, pad_token_id=self.tokenizer.pad_token_id,
                                       trust_remote_code=cfg.trust_remote_code, field="reward.model_name_or_path")
        self.model.eval()
        self.settings = TokenizeSettings(max_length=cfg.max_length, truncation_mode="keep_end")

    def ready(self) -> bool:
        return True

    def _ids(self, prompt, completion, index: int) -> list[int]:
        row = normalize_sft_row({"prompt": prompt, "completion": completion}, "score", index)
        tokens = tokenize_sft_row(row, self.tokenizer, self.settings, "score", index)
        return tokens["prompt_ids"] + tokens["completion_ids"]

    @on_compute_thread
    @torch.no_grad()
    def score(self, prompts: list, completions: list) -> list[float]:
        if len(prompts) != len(completions):
            raise DataError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        seqs = [self._ids(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions))]
        out: list[float] = []
        for start in range(0, len(seqs), self.cfg.batch_size):
            chunk = seqs[start:start + self.cfg.batch_size]
            ids, attention, _ = pad_sequences(chunk, [[0] * len(s) for s in chunk], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=ids, attention_mask=attention).logits.squeeze(-1)
            out.extend(float(x) for x in logits.float())
        return out
