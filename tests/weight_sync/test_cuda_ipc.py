"""The cuda_ipc channel (colocated learner + vLLM engine on one GPU). Without a GPU: the buckets
and their update infos are what vLLM's packed IPC receiver parses and unpacks (its own code, on
CPU tensors, with the IPC export replaced by an identity: CUDA IPC cannot exist here), the
config picks the channel only where it can work, and the engine asks vLLM for an ipc
weight-transfer engine and sleep mode. With a GPU (`gpu` marker): a real colocated push."""

from __future__ import annotations

import pytest
import torch

from rayalign.config import ConfigError, OnlineDPOConfig, load_config
from rayalign.weight_sync import resolve_weight_sync
from rayalign.weight_sync.cuda_ipc import bucket_infos

BASE = {"model_name_or_path": "m", "train_dataset": "p.jsonl", "reward_funcs": ["rayalign.demo.task:demo_reward"]}


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(64, 16, generator=g, dtype=torch.bfloat16),
            "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g, dtype=torch.bfloat16),
            "model.norm.weight": torch.randn(16, generator=g, dtype=torch.float16)}


def test_buckets_are_what_vllms_packed_ipc_receiver_parses_and_unpacks():
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo
    from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

    state = _state()
    shared = {}

    def share(buffer):  # stands in for reduce_tensor: the receiver gets the buffer itself
        shared[id(buffer)] = buffer
        return {"GPU-test": id(buffer)}

    buffers, infos = bucket_infos(state, bucket_bytes=2048, share=share)
    assert len(infos) > 1  # several buckets at this size
    got = {}
    for buffer, info in zip(buffers, infos):
        parsed = IPCWeightTransferUpdateInfo(**info)  # vLLM's own checks of the fields
        packed = shared[parsed.ipc_handles["GPU-test"]]
        assert packed is buffer and packed.numel() == sum(parsed.tensor_sizes)
        dtypes = [getattr(torch, d) for d in parsed.dtype_names]
        got.update(unpack_tensor(packed, parsed.names, parsed.shapes, dtypes, parsed.tensor_sizes))
    assert list(got) == list(state)
    for name, tensor in state.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.mark.parametrize("learner, rollout, backend, expected", [
    (0.5, 0.5, "vllm", "cuda_ipc"),  # one GPU shared: colocated
    (1, 1, "vllm", "nccl"),
    (0.5, 0.5, "hf", "object_store"),  # the HF engine has no IPC receiver
    (0, 0, "vllm", "object_store"),
])
def test_auto_picks_cuda_ipc_for_colocated_vllm(learner, rollout, backend, expected):
    cfg = load_config(OnlineDPOConfig, None, {**BASE, "learner": {"num_gpus_per_actor": learner},
                                              "rollout": {"num_gpus_per_actor": rollout}})
    assert resolve_weight_sync(cfg, backend) == expected


@pytest.mark.parametrize("over, field", [
    ({"rollout": {"weight_sync": "cuda_ipc"}}, "rollout.weight_sync"),  # CPU actors
    ({"learner": {"num_gpus_per_actor": 1}, "rollout": {"weight_sync": "cuda_ipc", "num_gpus_per_actor": 1}},
     "rollout.weight_sync"),  # whole GPUs each: the two cannot share one
    ({"learner": {"num_gpus_per_actor": 0.5},
      "rollout": {"weight_sync": "cuda_ipc", "num_gpus_per_actor": 0.5, "backend": "hf"}}, "rollout.weight_sync"),
    ({"learner": {"num_gpus_per_actor": 0.5, "num_actors": 2},
      "rollout": {"weight_sync": "cuda_ipc", "num_gpus_per_actor": 0.5}}, "rollout.weight_sync"),
])
def test_impossible_cuda_ipc_configs_name_the_field(over, field):
    with pytest.raises(ConfigError) as err:
        load_config(OnlineDPOConfig, None, {**BASE, **over})
    assert str(err.value).startswith(field), str(err.value)


def test_vllm_engine_gets_an_ipc_transfer_engine_and_sleep_mode():
    from rayalign.engines.vllm import vllm_engine_kwargs

    cfg = load_config(OnlineDPOConfig, None, {**BASE, "learner": {"num_gpus_per_actor": 0.5},
                                              "rollout": {"num_gpus_per_actor": 0.5, "weight_sync": "cuda_ipc"}})
    kwargs = vllm_engine_kwargs(cfg.rollout)
    assert kwargs["weight_transfer_config"].backend == "ipc" and kwargs["enable_sleep_mode"] is True
    awake = load_config(OnlineDPOConfig, None, {**BASE, "learner": {"num_gpus_per_actor": 0.5},
                                                "rollout": {"num_gpus_per_actor": 0.5, "weight_sync": "cuda_ipc",
                                                            "sleep_between_steps": False}})
    assert "enable_sleep_mode" not in vllm_engine_kwargs(awake.rollout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA GPU")
def test_colocated_push_over_cuda_ipc(ray_local, tiny_model_dir, tmp_path):
    """A learner and a vLLM engine on half a GPU each: a push maps the learner's buckets into the
    engine, whose loader receives exactly the learner's tensors (fingerprints, probe log-probs)."""
    from rayalign import weight_sync
    from rayalign.models.loading import load_tokenizer
    from tests.weight_sync.test_nccl import start_actors

    cfg = load_config(OnlineDPOConfig, None, {
        **BASE, "model_name_or_path": tiny_model_dir, "output_dir": str(tmp_path), "bf16": True,
        "learner": {"num_gpus_per_actor": 0.5}, "rollout": {"backend": "vllm", "num_gpus_per_actor": 0.5,
                                                             "weight_sync": "cuda_ipc", "enforce_eager": True,
                                                             "probe_tolerance": 5e-2}})
    learners, rollouts = start_actors(cfg, "vllm")
    try:
        vocab = len(load_tokenizer(tiny_model_dir))
        channel = weight_sync.build_channel(cfg, learners, rollouts, vocab, "cuda_ipc", str(tmp_path))
        channel.before_train()
        metrics = channel.push(1)
        assert metrics["sync/probe_max_abs_diff"] <= 5e-2
        assert rollouts.call("get_version") == [1]
    finally:
        learners.shutdown()
        rollouts.shutdown()
