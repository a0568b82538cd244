"""Every torch op of an actor runs on its process's one compute thread (rayalign.actors.compute):
a parallel op on any other thread gives the process a second OpenMP team, and GNU OpenMP then
makes every team sleep between parallel regions (measured: HF generate 1.38 -> 1.65 s)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from rayalign.actors.rollout import Rollout
from rayalign.config import RolloutConfig
from rayalign.models.weights import to_object_store


def test_rollout_engine_runs_all_torch_work_on_the_compute_thread(tiny_model_dir, monkeypatch):
    """Ray calls a synchronous actor's methods from threads of its own; here two plain threads
    stand in for them. Model loading, generate, weight loads, probes and fingerprints must all
    land on the compute thread, whichever thread called."""
    import rayalign.engines.hf as hf

    seen: dict[str, set[str]] = {}

    def record(what: str) -> None:
        seen.setdefault(what, set()).add(threading.current_thread().name)

    real_load, real_fingerprint = hf.load_causal_lm, hf.weights_lib.fingerprint
    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: (record("model load"), real_load(*a, **k))[1])
    monkeypatch.setattr(hf.weights_lib, "fingerprint", lambda t: (record("fingerprint"), real_fingerprint(t))[1])

    callers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ray-like")
    rollout = callers.submit(Rollout, tiny_model_dir, RolloutConfig(backend="hf", num_cpus_per_actor=2), "hf").result()
    model = rollout.engine.model
    model.register_forward_pre_hook(lambda *_: record("forward"))
    real_state_load = model.load_state_dict
    model.load_state_dict = lambda *a, **k: (record("load_state_dict"), real_state_load(*a, **k))[1]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sampling = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "n": 2}
    calls = [lambda: rollout.generate([[5, 6, 7]], sampling, seed=0),
             lambda: rollout.update_weights(to_object_store(state), 1, probe=[5, 6, 7, 8]),
             rollout.fingerprint, lambda: rollout.probe([5, 6, 7, 8])]
    for call in calls * 2:
        callers.submit(call).result()
    assert set(seen) == {"model load", "forward", "load_state_dict", "fingerprint"}
    for what, threads in seen.items():
        assert len(threads) == 1 and next(iter(threads)).startswith("rayalign-compute"), (what, threads)
