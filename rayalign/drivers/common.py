"""Pieces every driver uses: data preparation, evaluation, checkpoint publishing."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rayalign import data as data_lib
from rayalign import objectives, refcache, storage, stream
from rayalign.actors.group import ActorGroup
from rayalign.config import ConfigError, DPOConfig, TrainConfig
from rayalign.models.loading import load_tokenizer

logger = logging.getLogger("rayalign")


def backend(cfg: TrainConfig) -> str:
    return "nccl" if cfg.learner.num_gpus_per_actor > 0 else "gloo"


def local_cpus(ray_cfg, need: float, spare: int) -> int:
    """Logical CPUs for a Ray started by rayalign (`ray.num_cpus` if set): what every actor
    asks for plus `spare` for tasks beside them, and at least the machine's."""
    if ray_cfg.num_cpus is not None:
        import ray

        starts_ray = not ray.is_initialized() and not (ray_cfg.address or os.environ.get("RAY_ADDRESS"))
        if starts_ray and ray_cfg.num_cpus < math.ceil(need) + 1:
            # Ray Data's read / tokenize tasks (and the reward functions' driver work) need a CPU
            # the actors do not hold, or iteration waits forever
            raise ConfigError(f"ray.num_cpus: {ray_cfg.num_cpus} leaves no CPU beside the actors, which ask for "
                              f"{need:g}: set ray.num_cpus >= {math.ceil(need) + 1} (or leave it unset), or lower "
                              "the actors' num_cpus_per_actor")
        return ray_cfg.num_cpus
    return int(max(os.cpu_count() or 1, math.ceil(need) + spare))


def local_num_cpus(cfg: TrainConfig) -> int:
    """An offline job's: every actor plus two for Ray Data's read/tokenize tasks (iteration
    hangs when actors hold every CPU)."""
    need = cfg.learner.num_actors * cfg.learner.num_cpus_per_actor
    if isinstance(cfg, DPOConfig) and cfg.reference_mode in ("actor", "precompute"):
        need += cfg.reference.num_actors * cfg.reference.num_cpus_per_actor
    return local_cpus(cfg.ray, need, spare=2)


def actor_groups(cfg: TrainConfig) -> list[tuple[str, int, dict]]:
    """(role, num_actors, bundle per actor) for every actor group a job starts, in the order
    its bundles sit in a Ray Tune trial's placement group (after the trial's own bundle)."""
    from rayalign.actors.group import GroupSpec

    groups = [("learner", cfg.learner.num_actors, GroupSpec.of("learner", cfg.learner).bundle())]
    if isinstance(cfg, DPOConfig) and cfg.reference_mode == "actor":
        groups.append(("reference", cfg.reference.num_actors, GroupSpec.of("reference", cfg.reference).bundle()))
    return groups


def group_placements(cfg: TrainConfig) -> dict[str, tuple | None]:
    """Inside a Tune trial (its placement group captures child tasks) each group takes its
    bundles of the trial's group; elsewhere every group reserves its own."""
    import ray

    pg = ray.util.get_current_placement_group()
    out, first = {}, 1  # bundle 0 is the trial driver's
    for role, n, _ in actor_groups(cfg):
        out[role] = (pg, first) if pg is not None else None
        first += n
    return out


def steps_per_epoch(num_rows: int, cfg: TrainConfig) -> int:
    rows_per_shard = num_rows // cfg.learner.num_actors
    steps = rows_per_shard // cfg.per_device_train_batch_size // cfg.gradient_accumulation_steps
    if steps < 1:
        raise data_lib.DataError(
            f"train_dataset: {num_rows} rows are too few for one step of {cfg.learner.num_actors} "
            f"learner(s) x per_device_train_batch_size={cfg.per_device_train_batch_size} x "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}")
    return steps


def staging_root(cfg: TrainConfig) -> str:
    """Local scratch space next to the output (same filesystem: the commit is a rename);
    a temp dir when the output lives on remote storage (the commit is an upload)."""
    root = storage.local_path(cfg.output_dir)
    if root is None:
        import tempfile

        return tempfile.mkdtemp(prefix="rayalign-staging-")
    os.makedirs(root, exist_ok=True)
    return root


@dataclass
class PreparedData:
    """Data planned and sample-checked on the driver; `build` (once Ray runs) tokenizes it
    across the cluster (`rayalign.stream`) and makes each epoch's Ray Dataset."""

    kind: str
    train_path: str | None
    train_pieces: list | None  # stream.Piece list; None when only evaluating
    eval_path: str | None = None
    eval_pieces: list | None = None
    pad_token_id: int = 0
    tokenize_kwargs: dict = field(default_factory=dict)  # stream.tokenize's settings, shared by train and eval
    train: stream.Tokenized | None = None  # after build()
    _train: object = None
    _cache: tuple | None = None
    _cache_dir: str | None = None
    _row_index_array: np.ndarray | None = None
    eval_rows: list = field(default_factory=list)  # the first num_generate_prompts eval rows (generate_during_eval)
    cache_missed: bool = False  # precompute: the cache was missing when the job started
    scoring_seconds: float = 0.0  # spent scoring the train set before training

    @property
    def num_train_rows(self) -> int:
        return 0 if self.train is None else self.train.num_rows

    def tokenize(self, pieces: list, field_name: str) -> stream.Tokenized:
        return stream.tokenize(pieces, field=field_name, **self.tokenize_kwargs)

    def build(self, cfg: TrainConfig) -> tuple[Callable[[int], object], list]:
        """Tokenize across the cluster and create the Ray Datasets (after ray.init); returns
        (epoch -> dataset, eval batches: `_eval_batches`)."""
        if self.kind == "dpo" and cfg.reference_mode == "precompute":
            from rayalign.actors.group import check_custom_resources

            # a Ray Data stage asking for a resource no node has would wait for ever: fail now
            check_custom_resources(cfg.reference.resources, "reference")
        if self.train_pieces is not None:  # no training rows when only evaluating (prepare_data(eval_only=True))
            self.train = self.tokenize(self.train_pieces, "train_dataset")
            steps_per_epoch(self.train.num_rows, cfg)  # too few rows: fail before any actor starts
            self._train = self.train.dataset
        eval_batches = []
        if self.eval_pieces is not None:
            eval_batches = self._eval_batches(cfg, self.tokenize(self.eval_pieces, "eval_dataset").dataset)
        if self.kind == "dpo" and cfg.reference_mode == "precompute" and self.train is not None:
            self._cache_dir = refcache.cache_dir(cfg, self.train_path, stream.fingerprint(self.train_pieces))
            storage.makedirs(self._cache_dir)
            self._cache = refcache.load_cached(self._cache_dir, self.num_train_rows, self._row_index)
            logger.info("reference cache %s: %s", self._cache_dir, "hit" if self._cache else "miss")
            self.cache_missed = self._cache is None
            if self._cache is None and precompute_schedule(cfg) == "before_training":
                self._score_all(cfg)
        return self._epoch_dataset(cfg), eval_batches

    def _score_all(self, cfg: DPOConfig) -> None:
        """Score every training row now, with all of this node's cores (nothing else runs
        yet), and read the result back as the cache."""
        threads = max(1, (os.cpu_count() or 1) // cfg.reference.num_actors)
        started = time.perf_counter()
        self._attach_reference(cfg, self._train, threads=threads).materialize()
        if not refcache.finalize(self._cache_dir, self.num_train_rows):
            raise RuntimeError(f"reference cache {self._cache_dir}: scoring before training left rows unscored")
        self._cache = refcache.load_cached(self._cache_dir, self.num_train_rows, self._row_index)
        self.scoring_seconds = time.perf_counter() - started
        logger.info("reference cache written before training in %.1fs: %s", self.scoring_seconds, self._cache_dir)

    def _epoch_dataset(self, cfg: TrainConfig):
        def for_epoch(epoch: int):
            ds = self._train.random_shuffle(seed=cfg.seed + epoch)
            if self.kind == "dpo" and cfg.reference_mode == "precompute":
                ds = self._attach_reference(cfg, ds)
            return ds

        return for_epoch

    # -- precomputed reference log-probs ------------------------------------------------

    @property
    def uses_cache(self) -> bool:
        return self._cache_dir is not None

    @property
    def cache_hit(self) -> bool:
        """The job found a complete cache (not: wrote one before training)."""
        return self._cache is not None and not self.cache_missed

    @property
    def cache_complete(self) -> bool:
        """Every training row's reference log-probs are in the cache (found or written)."""
        return self._cache is not None

    def _attach_reference(self, cfg: DPOConfig, ds, cached=None, cache_dir=None, threads: int | None = None):
        cached = self._cache if cached is None else cached
        if cached is not None:
            chosen, rejected = cached

            def add(rows):
                idx = rows["row_index"].astype(np.int64)
                rows["ref_chosen_logps"] = chosen[idx]
                rows["ref_rejected_logps"] = rejected[idx]
                return rows

            return ds.map_batches(add, batch_format="numpy")
        from ray.data import ActorPoolStrategy

        from rayalign.actors.reference import ReferenceLogpsStage

        # Streams: learners train on scored blocks while later blocks are still being scored;
        # each scored block also lands in the cache directory.
        return ds.map_batches(
            ReferenceLogpsStage, fn_constructor_kwargs={"cfg": cfg, "cache_dir": cache_dir or self._cache_dir,
                                                        "threads": threads},
            compute=ActorPoolStrategy(size=cfg.reference.num_actors),
            num_cpus=cfg.reference.num_cpus_per_actor, num_gpus=cfg.reference.num_gpus_per_actor or None,
            resources=cfg.reference.resources or None, batch_size=cfg.reference.batch_size, batch_format="numpy")

    def _eval_batches(self, cfg: TrainConfig, evaluation) -> list[tuple]:
        """The eval set as (object ref, rows) per per_device_eval_batch_size batch in file
        order, collated as the learners' batches are and put in the object store one at a
        time: the driver holds references, not the eval rows (it keeps the first
        num_generate_prompts for generate_during_eval)."""
        import ray

        scored = None
        if self.kind == "dpo" and cfg.reference_mode == "precompute":
            scored = self._eval_reference(cfg, evaluation)
        objective = objectives.for_config(cfg)  # eval batches collate as the learners' do
        keep = getattr(cfg, "num_generate_prompts", 0)
        out, rows = [], []

        def put() -> None:
            out.append((ray.put(objective.collate(rows, self.pad_token_id)[0]), len(rows)))

        for row in evaluation.iter_rows():  # a materialized dataset: its blocks in file order
            if scored is not None:
                i = int(row["row_index"])
                row = {**row, "ref_chosen_logps": scored[0][i], "ref_rejected_logps": scored[1][i]}
            if len(self.eval_rows) < keep:
                self.eval_rows.append(row)
            rows.append(row)
            if len(rows) == cfg.per_device_eval_batch_size:
                put()
                rows = []
        if rows:
            put()
        return out

    def _eval_reference(self, cfg: DPOConfig, ds) -> tuple[np.ndarray, np.ndarray]:
        """The eval rows' reference log-probs (chosen, rejected; indexed by row_index), through
        the same cache as the training rows' (scored now on a miss)."""
        cache_dir = refcache.cache_dir(cfg, self.eval_path, stream.fingerprint(self.eval_pieces))
        storage.makedirs(cache_dir)
        row_index = np.concatenate([b["row_index"] for b in ds.select_columns(["row_index"]).iter_batches(
            batch_size=None, batch_format="numpy")]).astype(np.int64)
        cached = refcache.load_cached(cache_dir, len(row_index), row_index)
        if cached is None:
            self._attach_reference(cfg, ds, cache_dir=cache_dir).materialize()
            refcache.finalize(cache_dir, len(row_index))
            cached = refcache.load_cached(cache_dir, len(row_index), row_index)
        return cached

    def end_epoch(self, cfg: DPOConfig) -> None:
        """After the first pass in precompute mode the streamed parts become the cache; rows
        the pass skipped (equal splits drop a remainder) are scored here first."""
        if self._cache_dir is None or self._cache is not None:
            return
        missing = np.setdiff1d(self._row_index, np.fromiter(refcache.scored_rows(self._cache_dir), dtype=np.int64))
        if len(missing):
            def unscored(rows):
                return {k: v[np.isin(rows["row_index"], missing)] for k, v in rows.items()}

            self._attach_reference(cfg, self._train.map_batches(unscored, batch_format="numpy")).materialize()
        if refcache.finalize(self._cache_dir, self.num_train_rows):
            self._cache = refcache.load_cached(self._cache_dir, self.num_train_rows, self._row_index)
            logger.info("reference cache written: %s", self._cache_dir)

    @property
    def _row_index(self) -> np.ndarray:
        if self._row_index_array is None:
            self._row_index_array = self.train.row_index()
        return self._row_index_array


def precompute_schedule(cfg: DPOConfig) -> str:
    """reference.precompute_schedule with "auto" decided: streaming overlaps scoring with
    training only where they do not share CPUs (a reference on GPUs, or several nodes)."""
    import ray

    schedule = cfg.reference.precompute_schedule
    if schedule != "auto":
        return schedule
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return "stream" if cfg.reference.num_gpus_per_actor > 0 or len(nodes) > 1 else "before_training"


def prepare_data(cfg: TrainConfig, kind: str, *, eval_only: bool = False) -> PreparedData:
    """Check the tokenizer, plan the data's pieces and check the first rows of every file,
    before Ray work or model loading starts (the rest is tokenized across the cluster by
    `PreparedData.build`). `eval_only` (`rayalign eval-dpo` / `eval-reward`): the eval rows
    alone — eval_dataset, else dataset_name's dataset_test_split, else the training rows."""
    tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code,
                               field=cfg.tokenizer_field)
    settings = data_lib.TokenizeSettings(
        max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length, truncation_mode=cfg.truncation_mode)
    if kind == "reward":  # TRL's RewardTrainer keeps pairs whole and drops the over-long ones
        settings = dataclasses.replace(settings, max_length=None)
    data_kind = "sft" if kind == "sft" else "preference"

    reward_max_length = cfg.max_length if kind == "reward" else None

    def plan(source: data_lib.DataSource, name: str) -> tuple[list, int | None]:
        pieces = stream.plan(source, name)
        return pieces, stream.check_sample(pieces, tokenizer, settings, kind=data_kind,
                                           drop_bad_rows=cfg.drop_bad_rows, field=name,
                                           reward_max_length=reward_max_length)

    train = None
    if not eval_only:
        train, rows = plan(cfg.train_source, "train_dataset")
        if rows is not None:  # the sample was all of it: too few rows fail now, before Ray
            steps_per_epoch(rows, cfg)
    eval_source = cfg.eval_source
    if eval_only and eval_source is None:  # evaluation without eval data: the test split, else the training rows
        eval_source = (data_lib.DataSource(cfg.dataset_name, cfg.dataset_config, cfg.dataset_test_split)
                       if cfg.dataset_name and cfg.dataset_test_split else cfg.train_source)
    evaluation = plan(eval_source, "eval_dataset")[0] if eval_source else None
    tokenize_kwargs = dict(tokenizer_path=cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code,
                           settings=settings, kind=data_kind, drop_bad_rows=cfg.drop_bad_rows,
                           reward_max_length=reward_max_length, num_proc=cfg.dataset_num_proc)
    return PreparedData(kind, None if eval_only else str(cfg.train_source), train,
                        str(eval_source) if eval_source else None, evaluation,
                        pad_token_id=tokenizer.pad_token_id, tokenize_kwargs=tokenize_kwargs)


def check_models(cfg: TrainConfig) -> None:
    """Check the policy's model dir and a separate reference's (their files, custom code, and
    the job tokenizer against each embedding) before Ray starts or an actor loads them."""
    from rayalign.models.loading import check_model_dir

    tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code,
                               field=cfg.tokenizer_field)
    models = [(cfg.model_name_or_path, "model_name_or_path")]
    reference = getattr(cfg, "reference", None)
    if reference is not None and reference.model_name_or_path and cfg.reference_mode in ("actor", "precompute"):
        models.append((reference.model_name_or_path, "reference.model_name_or_path"))
    for path, name in models:
        check_model_dir(path, name, trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)


def eval_metrics(learners: ActorGroup, batches: list[tuple]) -> dict[str, float]:
    """eval_* metrics as TRL's `evaluate()` returns them (per_device_eval_batch_size batches in
    file order, as `PreparedData._eval_batches` gives them): eval_loss is the mean over eval
    rows of their batch's loss (Trainer repeats each batch's loss per row and accelerate cuts
    the last batch's copies to its rows); every
    other metric is the mean of its per-step values, each eval step counting once (TRL averages
    its per-step logs); plus eval_runtime / eval_samples_per_second / eval_steps_per_second.
    A step gives every learner one batch, as TRL's gives every process one (weight 0 pads the
    last step: every rank runs the same forwards, as ZeRO-3 gathers need). A step's value is
    TRL's over its processes: token-weighted metrics (`objectives.Pooled`) divide the summed
    totals by the summed counts, the others are the mean over the step's rows."""
    n = len(learners)
    per_step: list[tuple[int, dict]] = []  # (rows, metrics) of every step
    started = time.time()
    for first in range(0, len(batches), n):
        own = batches[first:first + n]  # (object ref of a collated batch, its rows)
        args = [([own[r][0]], [1.0]) if r < len(own) else ([batches[0][0]], [0.0]) for r in range(n)]
        results = learners.scatter("sum_eval_metrics", args)[:len(own)]
        count = sum(res["__count__"] for res in results)
        step = {k: sum(res[k] for res in results) / count for k in results[0] if not k.startswith("__")}
        for k in results[0]["__pooled__"]:
            total, tokens = (sum(res["__pooled__"][k][i] for res in results) for i in (0, 1))
            step[k] = total / tokens if tokens > 0 else 0.0
        per_step.append((sum(rows for _, rows in own), step))
    runtime = max(time.time() - started, 1e-9)
    metrics = {f"eval_{k}": sum(m[k] for _, m in per_step) / len(per_step) for k in per_step[0][1]}
    rows = sum(size for size, _ in per_step)
    metrics["eval_loss"] = sum(size * m["loss"] for size, m in per_step) / rows
    # TRL's speed_metrics: a step is one eval loop iteration, a batch on every learner
    steps = -(-len(batches) // n)
    return {**metrics, "eval_runtime": runtime, "eval_samples_per_second": rows / runtime,
            "eval_steps_per_second": steps / runtime}


def log_generations(cfg: DPOConfig, learners: ActorGroup, references, data: PreparedData,
                    tracker, step: int) -> None:
    """generate_during_eval: policy (and reference) completions for a few eval prompts."""
    rows = data.eval_rows[: cfg.num_generate_prompts]
    if not rows:
        return
    prompts = [list(map(int, r["prompt_ids"])) for r in rows]
    policy = learners.call("generate", prompts, cfg.max_new_tokens)[0]
    reference = references.actors[0].generate.remote(prompts, cfg.max_new_tokens) if references else None
    import ray

    if reference is not None:
        reference = ray.get(reference)
    else:  # implicit mode: the learner ran the adapter-off model; precompute/none: no live reference
        reference = policy.get("reference_completions", [None] * len(prompts))
    table = [{"prompt": p, "policy": c, "reference": r}
             for p, c, r in zip(policy["prompts"], policy["completions"], reference)]
    tracker.log_table("generate_during_eval", table, step)
