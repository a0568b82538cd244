"""The streaming data path (`rayalign.stream`): shards planned on the driver from metadata,
the first rows of each file checked before Ray, the rest tokenized by Ray tasks into a
Ray Dataset equal to the single-process table, and bad rows found by those tasks failing
the job by file, row and field (or counted with drop_bad_rows)."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayalign import stream
from rayalign.data import DataError, TokenizeSettings, read_rows, validate_file
from rayalign.models.loading import load_tokenizer
from tests.helpers import forbid_driver_tokenizing

SETTINGS = TokenizeSettings(max_length=64)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def rows(demo_data_dir):
    return read_rows(f"{demo_data_dir}/pref_train.jsonl")[:600]


def write_shards(root, rows, n, fmt="jsonl", bad=None):
    """`rows` split into `n` shards; `bad` (shard, row): that row's rejected equals its chosen."""
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // n)
    for k in range(n):
        part = [dict(r) for r in rows[k * per:(k + 1) * per]]
        if bad and bad[0] == k:
            part[bad[1]]["rejected"] = part[bad[1]]["chosen"]
        if fmt == "jsonl":
            (root / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        else:
            pq.write_table(pa.Table.from_pylist(part), root / f"part-{k}.parquet", row_group_size=50)
    return root


def cluster_tokenize(source, tiny_model_dir, **kw):
    kw = {"drop_bad_rows": False, "num_proc": None, "local_max_bytes": 0, **kw}  # 0: always Ray tasks
    return stream.tokenize(stream.plan(source, "train_dataset"), tokenizer_path=tiny_model_dir,
                           trust_remote_code=False, settings=SETTINGS, kind="preference", field="train_dataset",
                           **kw)


def test_parquet_pieces_come_from_metadata_and_read_only_their_row_groups(tmp_path, rows, monkeypatch):
    monkeypatch.setattr(stream, "PIECE_ROWS", 120)
    write_shards(tmp_path / "pq", rows, 2, fmt="parquet")  # 300 rows each, row groups of 50
    pieces = stream.plan(str(tmp_path / "pq"))
    assert [(p.name.rsplit("/", 1)[-1], p.start, p.stop) for p in pieces] == [
        ("part-0.parquet", 0, 120), ("part-0.parquet", 120, 240), ("part-0.parquet", 240, 300),
        ("part-1.parquet", 0, 120), ("part-1.parquet", 120, 240), ("part-1.parquet", 240, 300)]
    got = [r for p in pieces for r in stream.read_piece(p, "d")]  # slices cut inside row groups
    assert got == rows
    assert stream.read_piece(pieces[1], "d", limit=7) == rows[120:127]


def test_sharded_data_tokenized_on_the_cluster_equals_the_single_process_table(
        ray_local, tmp_path, rows, tok, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(stream, "PIECE_ROWS", 100)
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = validate_file(str(tmp_path / "all.jsonl"), tok, SETTINGS)[0].to_pylist()
    write_shards(tmp_path / "jsonl", rows, 4)
    write_shards(tmp_path / "pq", rows, 3, fmt="parquet")
    for source in (str(tmp_path / "jsonl" / "part-*.jsonl"), f"file://{tmp_path}/pq"):
        out = cluster_tokenize(source, tiny_model_dir, num_proc=1)  # dataset_num_proc=1: one task at a time
        got = out.dataset.take_all()
        assert out.num_rows == len(rows) and [r["row_index"] for r in got] == list(range(len(rows))), source
        for a, b in zip(got, want):
            assert [list(a[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")] == \
                   [b[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")], source
        assert sorted(out.row_index()) == list(range(len(rows)))
        small = cluster_tokenize(source, tiny_model_dir, local_max_bytes=1 << 30)  # the driver's shortcut
        assert small.dataset.take_all() == got, source


def test_a_bad_row_past_the_sample_fails_the_cluster_pass_by_shard_row_and_field(
        ray_local, tmp_path, rows, tok, tiny_model_dir):
    root = write_shards(tmp_path / "bad", rows, 4, bad=(2, 100))  # 150 rows a shard: row 100 is past the sample
    pieces = stream.plan(str(root / "*.jsonl"))
    assert stream.check_sample(pieces, tok, SETTINGS, kind="preference", drop_bad_rows=False,
                               field="train_dataset") is None  # the sample is clean and not the whole data
    with pytest.raises(DataError, match=r"part-2.jsonl row 100, field 'rejected': identical to chosen"):
        cluster_tokenize(str(root / "*.jsonl"), tiny_model_dir)
    out = cluster_tokenize(str(root / "*.jsonl"), tiny_model_dir, drop_bad_rows=True)
    assert (out.num_rows, out.num_dropped) == (len(rows) - 1, 1)
    assert 2 * 150 + 100 not in set(out.row_index())  # the dataset row of shard 2's row 100


def test_small_data_is_checked_whole_before_ray(tmp_path, rows, tok):
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    pieces = stream.plan(str(tmp_path / "few.jsonl"))
    assert stream.check_sample(pieces, tok, SETTINGS, kind="preference", drop_bad_rows=False, field="d") == 10
    bad = [dict(r) for r in rows[:10]]
    bad[3].pop("chosen")
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(DataError, match=r"bad.jsonl row 3, field 'chosen': missing"):
        stream.check_sample(stream.plan(str(tmp_path / "bad.jsonl")), tok, SETTINGS, kind="preference",
                            drop_bad_rows=False, field="d")


def test_the_fingerprint_covers_the_shard_set(tmp_path, rows):
    root = write_shards(tmp_path / "s", rows, 3)
    first = stream.fingerprint(stream.plan(str(root / "*.jsonl")))
    assert stream.fingerprint(stream.plan(str(root / "*.jsonl"))) == first
    (root / "part-1.jsonl").write_text((root / "part-1.jsonl").read_text().replace("a", "b", 1))
    assert stream.fingerprint(stream.plan(str(root / "*.jsonl"))) != first  # one shard's content changed
    (root / "part-3.jsonl").write_text((root / "part-0.jsonl").read_text())
    changed = stream.fingerprint(stream.plan(str(root / "*.jsonl")))
    (root / "part-3.jsonl").unlink()
    assert changed != stream.fingerprint(stream.plan(str(root / "*.jsonl")))  # a shard added


def test_a_job_holds_no_rows_before_ray_and_trains_on_shards(ray_local, tmp_path, rows, tiny_model_dir):
    """prepare_data keeps only the plan; the DPO job (precompute reference: the cache is keyed
    by the shard set and written from the streamed pass) trains from the shard glob."""
    import rayalign
    from rayalign.config import DPOConfig, load_config
    from rayalign.drivers.common import prepare_data

    root = write_shards(tmp_path / "s", rows[:96], 3)
    cfg = {"model_name_or_path": tiny_model_dir, "train_dataset": str(root / "*.jsonl"),
           "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
           "max_length": 64, "gradient_checkpointing": False, "logging": {"report_to": [], "progress_bar": False},
           "reference": {"mode": "precompute", "cache_dir": str(tmp_path / "cache")}}
    data = prepare_data(load_config(DPOConfig, None, cfg), "dpo")
    assert data.train is None and len(data.train_pieces) == 3  # planned and sampled, nothing tokenized yet
    result = rayalign.train_dpo(cfg)
    assert result["reference_cache"] == "miss" and result["total_steps"] == 3
    again = rayalign.train_dpo({**cfg, "output_dir": str(tmp_path / "again")})
    assert again["reference_cache"] == "hit"


def prompt_rows(n: int) -> list[dict]:
    """Prompt-only rows as online DPO reads them: string and message prompts mixed (JSON lines
    allow it), extra columns for the reward functions, some of them None."""
    rows = []
    for i in range(n):
        prompt = f"Reverse: {' '.join('abcdef'[:2 + i % 4])} ->"
        rows.append({"prompt": [{"role": "user", "content": prompt}] if i % 3 == 0 else prompt,
                     "answer": f"a{i}", "n": i, "note": None if i % 2 else {"k": [i]}})
    return rows


def prompt_tokenize(source, tiny_model_dir, **kw):
    kw = {"drop_bad_rows": False, "local_max_bytes": 0, **kw}  # 0: always Ray tasks
    return stream.tokenize(stream.plan(source, "train_dataset"), tokenizer_path=tiny_model_dir,
                           trust_remote_code=False, settings=TokenizeSettings(), kind="prompt",
                           field="train_dataset", **kw)


def test_prompt_rows_tokenized_by_ray_tasks_come_back_as_read_with_prompt_ids(ray_local, tmp_path, tok,
                                                                              tiny_model_dir, monkeypatch):
    """kind "prompt" (online DPO): one Ray task per shard; each row comes back with its
    columns exactly as read (message lists as dicts, None, ints) and its prompt_ids (the chat
    template with the generation prompt for messages), in file order."""
    from rayalign.data import prompt_rows as as_rows
    from rayalign.data import prompt_text_and_ids

    rows = prompt_rows(90)
    for k in range(3):
        (tmp_path / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k * 30:(k + 1) * 30]))

    def all_rows(ds):
        return [r for batch in ds.iter_batches(batch_size=7, batch_format="pyarrow") for r in as_rows(batch)]

    small = prompt_tokenize(str(tmp_path / "part-*.jsonl"), tiny_model_dir, local_max_bytes=1 << 30)
    forbid_driver_tokenizing(monkeypatch)
    out = prompt_tokenize(str(tmp_path / "part-*.jsonl"), tiny_model_dir)
    got = all_rows(out.dataset)
    assert got == [{**r, "prompt_ids": prompt_text_and_ids(r["prompt"], tok)[1]} for r in rows]
    assert tok.decode(got[0]["prompt_ids"]).endswith("<|assistant|>\n")  # messages: the generation prompt
    assert (out.num_rows, out.num_dropped) == (90, 0) and list(out.row_index()) == list(range(90))
    assert all_rows(small.dataset) == got  # the driver's shortcut for small data: the same rows


def test_a_bad_prompt_past_the_sample_fails_by_file_row_and_field_or_is_dropped(ray_local, tmp_path, tok,
                                                                                tiny_model_dir):
    from rayalign.data import BAD_PROMPT

    rows = prompt_rows(100)
    rows[80]["prompt"] = "  "  # past the 64 rows checked before Ray
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pieces = stream.plan(str(tmp_path / "p.jsonl"))
    assert stream.check_sample(pieces, tok, TokenizeSettings(), kind="prompt", drop_bad_rows=False,
                               field="train_dataset") is None
    with pytest.raises(DataError, match=re.escape(f"p.jsonl row 80, field 'prompt': {BAD_PROMPT}")):
        prompt_tokenize(str(tmp_path / "p.jsonl"), tiny_model_dir)
    out = prompt_tokenize(str(tmp_path / "p.jsonl"), tiny_model_dir, drop_bad_rows=True)
    assert (out.num_rows, out.num_dropped) == (99, 1) and 80 not in set(out.row_index())
    (tmp_path / "none.jsonl").write_text("".join(json.dumps({"prompt": None, "n": i}) + "\n" for i in range(80)))
    with pytest.raises(DataError, match=r"train_dataset: .*none.jsonl has no usable prompt rows \(80 dropped\)"):
        prompt_tokenize(str(tmp_path / "none.jsonl"), tiny_model_dir, drop_bad_rows=True)

