"""Adding a rollout backend is one module plus one line in `ENGINES`: a trivial engine
(the HF engine under another name) registered here runs in a real Rollout actor on a local
Ray — generate, object-store weight push, probe — and the drivers' questions about a
backend (resolve_backend, weight-sync wire and ranks) come from its class."""

from __future__ import annotations

import pytest
import ray

from rayalign import weight_sync
from rayalign.actors import rollout
from rayalign.actors.group import ActorGroup, GroupSpec
from rayalign.actors.rollout import actor_env
from rayalign.config import OnlineDPOConfig, RolloutConfig, from_dict
from rayalign.engines import ENGINES, engine_class, resolve_backend
from rayalign.engines.hf import HFEngine
from rayalign.models import weights as weights_lib
from rayalign.models.loading import load_causal_lm, load_tokenizer
from rayalign.weight_sync import nccl

GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": None,
          "repetition_penalty": 1.0, "generation_kwargs": None, "n": 1}


class WrappedHF(HFEngine):
    """The new backend: HF generation, counted."""

    name = "wrapped-hf"

    def generate(self, ids, sampling, seed, eos_ids):
        self.calls = getattr(self, "calls", 0) + 1
        return super().generate(ids, sampling, seed, eos_ids)


ENGINES["wrapped-hf"] = WrappedHF  # the registry line (in rayalign/engines/__init__.py for a real backend)


class Rollout(rollout.Rollout):
    """The rollout actor itself, defined here only so that Ray workers import this module
    (and so its registry line) before building the engine."""


def _engine_info(actor) -> tuple[str, int]:
    return type(actor.engine).__name__, actor.engine.calls


def start(model_dir: str, backend: str) -> ActorGroup:
    rcfg = RolloutConfig(num_actors=1, num_cpus_per_actor=0.5)
    group = ActorGroup(Rollout, GroupSpec(f"rollout-{backend}", 1, 0.5, 0), args=(model_dir, rcfg, backend, None, 64),
                       env_vars=actor_env(rcfg))
    group.call("ready", timeout=300)
    return group


@pytest.mark.slow
def test_a_registered_engine_runs_in_a_rollout_actor(ray_local, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ids = [tok("Reverse: a b c ->")["input_ids"], tok("Reverse: c a ->")["input_ids"]]
    wrapped, hf = start(tiny_model_dir, "wrapped-hf"), start(tiny_model_dir, "hf")
    try:
        assert wrapped.call("ready")[0]["backend"] == "wrapped-hf"
        result = ray.get(wrapped.actors[0].generate.remote(ids, GREEDY, 0), timeout=300)
        assert result.completions == ray.get(hf.actors[0].generate.remote(ids, GREEDY, 0), timeout=300).completions
        assert ray.get(wrapped.actors[0].__ray_call__.remote(_engine_info)) == ("WrappedHF", 1)
        model = load_causal_lm(tiny_model_dir)
        state = weights_lib.export_state_dict(model)
        state.pop("lm_head.weight", None)
        loaded = ray.get(wrapped.actors[0].update_weights.remote(state, 3, weights_lib.probe_ids(len(tok))))
        assert loaded.version == 3 and weights_lib.fingerprints_match(loaded.fingerprint,
                                                                      weights_lib.fingerprint(state.values()))
        expected = weights_lib.probe_logprobs(model, weights_lib.probe_ids(len(tok)))
        assert max(abs(a - b) for a, b in zip(loaded.probe, expected)) < 1e-5
    finally:
        wrapped.shutdown()
        hf.shutdown()


def test_the_drivers_ask_the_engine_class():
    assert resolve_backend("wrapped-hf") == "wrapped-hf"
    assert engine_class("wrapped-hf") is WrappedHF
    with pytest.raises(ValueError, match="rollout backend 'nope': expected one of"):
        engine_class("nope")
    cfg = from_dict(OnlineDPOConfig, {"model_name_or_path": "m", "train_dataset": "d", "reward_funcs": ["a:b"],
                                      "learner": {"num_gpus_per_actor": 1},
                                      "rollout": {"num_gpus_per_actor": 1}})
    assert weight_sync.resolve_weight_sync(cfg, "wrapped-hf") == "object_store"  # inherits HF's: no auto nccl
    assert nccl.group_kind(cfg, "wrapped-hf") == "nccl"
    assert WrappedHF.receiving_ranks(cfg.rollout) == 1
