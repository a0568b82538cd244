"""The synchronous-step cost model of docs/scaling.md, evaluated for 8-64 GPUs.

    python benchmarks/scaling_model.py        # prints the tables docs/scaling.md shows

Every input is an assumption stated in ASSUMED (published peak numbers, an MFU, achieved
bandwidths); nothing here is a measurement. The per-step parts it adds up are the ones
benchmarks/bench_scaling.py measures on the CPU machine (compute, gradient all-reduce,
generation, weight push, driver).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rayalign.batch import deal_by_tokens  # noqa: E402  (the learners' own deal)

ASSUMED = {
    "peak_bf16_flops": 989e12,  # H100 / H200 SXM dense bf16 (NVIDIA data sheets; H200 has the same compute)
    "hbm_bytes_per_s": {"H100": 3.35e12, "H200": 4.8e12},  # data sheets
    "mfu_train": 0.40,  # model FLOPs utilisation of a learner step (DPO on 1-2k-token pairs)
    "mfu_generate": 0.30,  # when generation is compute-bound (large decode batches)
    "decode_bw_efficiency": 0.6,  # fraction of HBM bandwidth a memory-bound decode step reaches
    "allreduce_bus_bytes_per_s": {"intra_node": 400e9, "inter_node": 40e9},  # NVLink node; 400 Gb/s NIC per GPU
    "gpus_per_node": 8,
    "driver_s": 0.01,  # Ray calls and driver work per synchronous step
}


# Sequence lengths like the realistic-scale data (benchmarks/scale.py, measured with its tokenizer):
# log-normal, p90 / p50 = 326 / 118, cut at max_length = 3.25x the median; chosen and rejected
# independent (their measured correlation: 0.01).
LENGTHS = {"p90_over_p50": 326 / 118, "cap_over_p50": 384 / 118}


def rank_skew(n: int, pairs_per_gpu: int, dealt: bool, reps: int = 2000, seed: int = 0) -> float:
    """E[tokens of the busiest rank] / E[tokens per rank] for a synchronous step of n ranks x
    pairs_per_gpu pairs with LENGTHS: every rank waits for the busiest one at the gradient
    all-reduce, so compute time scales by this. `dealt`: the step's pairs dealt by tokens
    (learner.balance_tokens: longest first to the lightest rank with room); else as split.
    On this data, 2 ranks x 4 pairs: 1.137 split (the real pairs: 1.121; the learners'
    measured imbalance: 1.133), 1.022 dealt (measured: 1.016)."""
    rng = random.Random(seed)
    sigma = math.log(LENGTHS["p90_over_p50"]) / 1.2816  # z of the 90th percentile

    def pair() -> float:
        return sum(min(math.exp(rng.gauss(0.0, sigma)), LENGTHS["cap_over_p50"]) for _ in range(2))

    busiest = mean = 0.0
    for _ in range(reps):
        tokens = [pair() for _ in range(n * pairs_per_gpu)]
        groups = deal_by_tokens(tokens, n) if dealt else \
            [range(r * pairs_per_gpu, (r + 1) * pairs_per_gpu) for r in range(n)]
        loads = [sum(tokens[i] for i in g) for g in groups]
        busiest += max(loads)
        mean += sum(loads) / n
    return busiest / mean


def comm_bw(n: int) -> float:
    a = ASSUMED["allreduce_bus_bytes_per_s"]
    return a["intra_node"] if n <= ASSUMED["gpus_per_node"] else a["inter_node"]


def allreduce_s(num_bytes: float, n: int) -> float:
    """Ring all-reduce (or ZeRO-2's reduce-scatter + all-gather, the same volume): each GPU
    moves 2 (n - 1) / n of the buffer at the bus bandwidth."""
    return 0.0 if n == 1 else num_bytes * 2 * (n - 1) / n / comm_bw(n)


def offline_dpo(params: float, n: int, pairs_per_gpu: int = 4, tokens_per_seq: int = 1024,
                live_reference: bool = False, overlap: bool = False, lengths: str = "equal") -> dict:
    """`tokens_per_seq` is the mean; `lengths`: "equal" (every sequence that long), or LENGTHS'
    spread with the pairs "split" as they come or "dealt" by tokens (the busiest rank sets the
    step). Efficiency: the mean rank's compute over the step."""
    tokens = pairs_per_gpu * 2 * tokens_per_seq  # chosen + rejected
    flops = (6 + (2 if live_reference else 0)) * params * tokens
    compute = flops / (ASSUMED["peak_bf16_flops"] * ASSUMED["mfu_train"])
    busiest = compute * (1.0 if lengths == "equal" or n == 1 else rank_skew(n, pairs_per_gpu, lengths == "dealt"))
    comm = allreduce_s(2 * params, n)  # bf16 gradients
    step = (max(busiest, comm) if overlap else busiest + comm) + ASSUMED["driver_s"]
    return {"gpus": n, "compute_s": compute, "busiest_s": busiest, "comm_s": comm, "step_s": step,
            "pairs_per_s": n * pairs_per_gpu / step, "efficiency": compute / step}


def online_dpo(params: float, learner_gpus: int, rollout_gpus: int, prompts: int, prompt_tokens: int,
               new_tokens: int, gpu: str = "H100") -> dict:
    """One synchronous step: generate 2 completions per prompt on the rollout GPUs, then
    train on the pairs, then push the weights to every engine (NCCL broadcast, bf16)."""
    seqs_per_engine = 2 * prompts / rollout_gpus
    # decode: each new token reads the weights once (memory-bound) or costs 2 P flops per sequence
    per_token = max(2 * params / (ASSUMED["hbm_bytes_per_s"][gpu] * ASSUMED["decode_bw_efficiency"]),
                    2 * params * seqs_per_engine / (ASSUMED["peak_bf16_flops"] * ASSUMED["mfu_generate"]))
    prefill = 2 * params * seqs_per_engine * prompt_tokens / (ASSUMED["peak_bf16_flops"] * ASSUMED["mfu_generate"])
    generate = prefill + new_tokens * per_token
    tokens = 2 * prompts * (prompt_tokens + new_tokens) / learner_gpus
    train = (6 + 2) * params * tokens / (ASSUMED["peak_bf16_flops"] * ASSUMED["mfu_train"])  # + reference
    train += allreduce_s(2 * params, learner_gpus)
    push = 2 * params / comm_bw(learner_gpus + rollout_gpus)
    step = generate + train + push + ASSUMED["driver_s"]
    return {"gpus": learner_gpus + rollout_gpus, "generate_s": generate, "train_s": train, "push_s": push,
            "step_s": step, "prompts_per_s": prompts / step}


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def main() -> None:
    for name, params in (("0.5B", 0.5e9), ("7B", 7e9)):
        print(f"\nOffline DPO, {name}, 4 pairs x 1024 tokens per GPU, precomputed reference, no overlap:")
        print(table([offline_dpo(params, n) for n in (1, 8, 16, 32, 64)],
                    ["gpus", "compute_s", "comm_s", "step_s", "pairs_per_s", "efficiency"]))
    for name, params in (("0.5B", 0.5e9), ("7B", 7e9)):
        print(f"\nOffline DPO, {name}, 4 pairs per GPU of 1024 tokens on average, long-tailed lengths "
              "(LENGTHS), no overlap: pairs as split / dealt by tokens:")
        rows = []
        for n in (2, 8, 16, 32, 64):
            split, dealt = (offline_dpo(params, n, lengths=k) for k in ("split", "dealt"))
            rows.append({"gpus": n, "busiest/mean split": split["busiest_s"] / split["compute_s"],
                         "efficiency split": split["efficiency"],
                         "busiest/mean dealt": dealt["busiest_s"] / dealt["compute_s"],
                         "efficiency dealt": dealt["efficiency"],
                         "pairs_per_s dealt / split": dealt["pairs_per_s"] / split["pairs_per_s"]})
        print(table(rows, list(rows[0])))
    for name, params in (("0.5B", 0.5e9), ("7B", 7e9)):
        print(f"\nOnline DPO, {name}, H100, 32 prompts per learner GPU, prompt 256 + 256 new tokens, "
              "half the GPUs learn, half generate:")
        rows = [online_dpo(params, n // 2, n // 2, 32 * (n // 2), 256, 256) for n in (8, 16, 32, 64)]
        print(table(rows, ["gpus", "generate_s", "train_s", "push_s", "step_s", "prompts_per_s"]))


if __name__ == "__main__":
    main()
