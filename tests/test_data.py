"""Data: the three preference formats, readers, bad rows named by file/row/field, Ray Data."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayalign.data import (DataError, TokenizeSettings, extract_prompt, normalize_preference_row, read_rows,
                           tokenize_preference_row, validate_file)
from rayalign.models.loading import load_tokenizer

SETTINGS = TokenizeSettings(max_length=64)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tokenize(row, tok, settings=SETTINGS):
    return tokenize_preference_row(normalize_preference_row(row, "t", 0), tok, settings)


def test_standard_row_gets_eos_and_splits_at_the_prompt(tok):
    out = tokenize({"prompt": "Reverse: a b ->", "chosen": " b a", "rejected": " a b"}, tok)
    assert out["chosen_ids"][-1] == tok.eos_token_id and out["rejected_ids"][-1] == tok.eos_token_id
    assert tok.decode(out["prompt_ids"]) == "Reverse: a b ->"
    assert tok.decode(out["chosen_ids"], skip_special_tokens=True) == " b a"


def test_conversational_prompt_gets_generation_prompt(tok):
    row = {"prompt": [{"role": "user", "content": "Reverse: a b ->"}],
           "chosen": [{"role": "assistant", "content": "b a"}],
           "rejected": [{"role": "assistant", "content": "a b"}]}
    out = tokenize(row, tok)
    assert tok.decode(out["prompt_ids"]).endswith("<|assistant|>\n")
    assert tok.decode(out["chosen_ids"]).startswith("b a</s>")


def test_implicit_prompt_is_extracted_like_trl(tok):
    from trl.data_utils import extract_prompt as trl_extract

    row = {"chosen": "\n\nHuman: Reverse: a b ->\n\nAssistant: b a",
           "rejected": "\n\nHuman: Reverse: a b ->\n\nAssistant: a b"}
    ours = extract_prompt(row["chosen"], row["rejected"])
    theirs = trl_extract(dict(row))
    assert ours == (theirs["prompt"], theirs["chosen"], theirs["rejected"])
    assert tokenize(row, tok)["chosen_ids"][-1] == tok.eos_token_id


def test_demo_files_in_all_formats_tokenize(tok, demo_data_dir):
    for name in ("pref_train.jsonl", "pref_train_conversational.jsonl", "pref_train_implicit.jsonl"):
        table, info = validate_file(f"{demo_data_dir}/{name}", tok, SETTINGS)
        assert info.num_dropped == 0 and table.num_rows == info.num_rows > 0


def test_max_prompt_and_completion_length_extras(tok):
    row = {"prompt": "Reverse: a b c d e f g h ->", "chosen": " h g f e d c b a", "rejected": " a b c d e f g h"}
    full = tokenize(row, tok)
    cut = tokenize(row, tok, TokenizeSettings(max_length=64, max_prompt_length=4, max_completion_length=3,
                                              truncation_mode="keep_end"))
    assert cut["prompt_ids"] == full["prompt_ids"][-4:]
    assert cut["chosen_ids"] == full["chosen_ids"][:3]


BAD_ROWS = [
    ({"prompt": "p", "rejected": " x"}, "chosen", "missing"),
    ({"prompt": "p", "chosen": " x"}, "rejected", "missing"),
    ({"prompt": 3, "chosen": " x", "rejected": " y"}, "prompt", "expected a string"),
    ({"prompt": "p", "chosen": ["x"], "rejected": " y"}, "chosen", "expected a string"),
    ({"prompt": "p", "chosen": " same", "rejected": " same"}, "rejected", "identical"),
    ({"prompt": "Reverse: " + "a " * 80, "chosen": " x", "rejected": " y"}, "prompt", "no room"),
    ({"prompt": "p", "chosen": " x", "rejected": " y", "margin": "big"}, "margin", "number"),
]


@pytest.mark.parametrize("bad, field, why", BAD_ROWS, ids=[f"{f}-{w}" for _, f, w in BAD_ROWS])
def test_bad_rows_name_file_row_and_field(tmp_path, tok, bad, field, why):
    good = {"prompt": "Reverse: a b ->", "chosen": " b a", "rejected": " a b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as err:
        validate_file(path, tok, SETTINGS)
    msg = str(err.value)
    assert "bad.jsonl" in msg and "row 2" in msg and repr(field) in msg and why in msg, msg
    table, info = validate_file(path, tok, SETTINGS, drop_bad_rows=True)
    assert info.num_dropped == 1 and table.num_rows == 3
    assert table["row_index"].to_pylist() == [0, 1, 3]


def test_missing_file_and_unknown_format(tmp_path, tok):
    with pytest.raises(DataError, match="train_dataset: file not found"):
        validate_file(str(tmp_path / "nope.jsonl"), tok, SETTINGS)
    (tmp_path / "x.txt").write_text("a,b")
    with pytest.raises(DataError, match="unknown format"):
        read_rows(str(tmp_path / "x.txt"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match="row 1"):
        read_rows(str(tmp_path / "broken.jsonl"))


def test_conversational_data_needs_a_chat_template(tmp_path, tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    with pytest.raises(DataError, match="chat template"):
        validate_file(write_jsonl(tmp_path / "c.jsonl", [row]), plain, SETTINGS)


def test_jsonl_parquet_and_save_to_disk_read_the_same(tmp_path, tok, demo_data_dir):
    import datasets

    rows = read_rows(f"{demo_data_dir}/pref_eval.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    want = validate_file(f"{demo_data_dir}/pref_eval.jsonl", tok, SETTINGS)[0]
    for path in (str(tmp_path / "d.parquet"), str(tmp_path / "disk"), str(tmp_path / "dd") + ":test"):
        assert validate_file(path, tok, SETTINGS)[0].equals(want), path
    with pytest.raises(DataError, match="name one as"):
        read_rows(str(tmp_path / "dd"))


def test_cluster_tokenization_equals_the_pure_function(ray_local, tiny_model_dir, demo_data_dir, tok):
    from rayalign import stream

    path = f"{demo_data_dir}/pref_train_conversational.jsonl"
    want = validate_file(path, tok, SETTINGS)[0].to_pylist()
    out = stream.tokenize(stream.plan(path), tokenizer_path=tiny_model_dir, trust_remote_code=False,
                          settings=SETTINGS, kind="preference", drop_bad_rows=False, field="train_dataset",
                          local_max_bytes=0)  # Ray tasks, not the small-data shortcut
    got = out.dataset.take_all()
    assert out.num_rows == len(want) == len(got)
    for a, b in zip(got, want):
        assert a["row_index"] == b["row_index"]
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert list(a[k]) == b[k]
    shards = out.dataset.streaming_split(2, equal=True)
    import ray

    @ray.remote(num_cpus=0)
    def consume(shard):
        return [int(i) for b in shard.iter_batches(batch_size=64, batch_format="numpy") for i in b["row_index"]]

    seen = ray.get([consume.remote(s) for s in shards])
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1])
    assert len(seen[0]) + len(seen[1]) >= out.num_rows - 1


def test_json_array_csv_and_load_dataset_dirs_read_like_datasets(tmp_path):
    """Every source a TRL user points load_dataset at reads the same rows: a JSON array file,
    a CSV file, and a local dataset dir with configs and splits (load_dataset's data-dir layout,
    read offline; a hub id goes down the same load_dataset call)."""
    import datasets

    from rayalign.data import DataSource

    rows = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(5)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert read_rows(str(tmp_path / "rows.json")) == rows
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "rows.csv"), index=False)
    assert read_rows(str(tmp_path / "rows.csv")) == rows
    root = tmp_path / "my-dataset"
    for config, split, part in (("easy", "train", rows[:3]), ("easy", "test", rows[3:]), ("hard", "train", rows[:1])):
        (root / config).mkdir(parents=True, exist_ok=True)
        write_jsonl(root / config / f"{split}.jsonl", part)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: easy\n  data_files:\n  - split: train\n"
                                    "    path: easy/train.jsonl\n  - split: test\n    path: easy/test.jsonl\n"
                                    "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n"
                                    "---\n")
    expected = datasets.load_dataset(str(root), "easy", split="test").to_list()
    assert read_rows(DataSource(str(root), "easy", "test")) == expected == rows[3:]
    assert read_rows(DataSource(str(root), "hard", "train")) == rows[:1]
    with pytest.raises(DataError, match="holds splits"):
        read_rows(DataSource(str(root), "easy"))
    with pytest.raises(DataError, match="train_dataset: datasets.load_dataset"):
        read_rows(DataSource(str(root), "missing-config", "train"), "train_dataset")


def test_dataset_name_trains_and_evaluates_from_its_splits(ray_local, tmp_path, tok):
    """TRL's ScriptArguments: dataset_name + dataset_config + the two split names."""
    from rayalign.config import DPOConfig, load_config
    from rayalign.drivers.common import prepare_data

    root = tmp_path / "prefs"
    good = [{"prompt": "Reverse: a b ->", "chosen": " b a", "rejected": " a b"}] * 12
    root.mkdir()
    write_jsonl(root / "train.jsonl", good)
    write_jsonl(root / "test.jsonl", good[:4])
    cfg = load_config(DPOConfig, None, {"model_name_or_path": tok.name_or_path, "dataset_name": str(root),
                                        "eval_strategy": "steps", "eval_steps": 5,
                                        "per_device_train_batch_size": 2, "output_dir": str(tmp_path / "out")})
    data = prepare_data(cfg, "dpo")
    _, eval_batches = data.build(cfg)
    assert data.num_train_rows == 12 and [rows for _, rows in eval_batches] == [4]  # the test split
    assert all(isinstance(ref, ray_local.ObjectRef) for ref, _ in eval_batches)  # in the object store, not the driver


def test_globs_uris_and_shard_dirs_read_every_shard_in_order(tmp_path, monkeypatch):
    """A glob of JSONL shards, a file:// URI of a Parquet shard dir, and the same dir read through
    pyarrow's filesystem API (the path an s3:// / gs:// store takes; such stores cannot be reached
    here, so the local filesystem stands in for one behind its URI)."""
    from rayalign import storage

    rows = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(9)]
    for k in range(3):
        write_jsonl(tmp_path / f"shard-{k}.jsonl", rows[3 * k:3 * k + 3])
        (tmp_path / "pq").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows[3 * k:3 * k + 3]), tmp_path / "pq" / f"part-{k}.parquet")
    assert read_rows(str(tmp_path / "shard-*.jsonl")) == rows
    assert read_rows(f"file://{tmp_path}/pq") == rows
    monkeypatch.setattr(storage, "local_path", lambda path: None)  # take the remote-store code path
    assert read_rows(f"file://{tmp_path}/pq") == rows
    assert read_rows(f"file://{tmp_path}/shard-1.jsonl") == rows[3:6]
    with pytest.raises(DataError, match="train_dataset: not found"):
        read_rows(f"file://{tmp_path}/nope", "train_dataset")
    with pytest.raises(DataError, match="matches no"):
        read_rows(str(tmp_path / "none-*.jsonl"))


def test_column_mapping_renames_columns_and_names_a_missing_one(tmp_path, tok):
    from rayalign.config import DPOConfig, load_config

    rows = [{"question": "Reverse: a b ->", "response_j": " b a", "response_k": " a b"}] * 3
    mapping = {"question": "prompt", "response_j": "chosen", "response_k": "rejected"}
    good = write_jsonl(tmp_path / "se.jsonl", rows)
    cfg = load_config(DPOConfig, None, {"model_name_or_path": "m", "train_dataset": str(good),
                                        "column_mapping": mapping})
    assert read_rows(cfg.train_source)[0] == {"prompt": "Reverse: a b ->", "chosen": " b a", "rejected": " a b"}
    assert validate_file(cfg.train_source, tok, SETTINGS)[0].num_rows == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + [{"question": "q", "response_j": " x"}])
    cfg = load_config(DPOConfig, None, {"model_name_or_path": "m", "train_dataset": str(bad),
                                        "column_mapping": mapping})
    with pytest.raises(DataError, match=r"row 3, field 'response_k': missing \(column_mapping"):
        validate_file(cfg.train_source, tok, SETTINGS)
    with pytest.raises(Exception, match="column_mapping.question"):
        load_config(DPOConfig, None, {"model_name_or_path": "m", "train_dataset": good,
                                      "column_mapping": {"question": "query"}})


def test_in_memory_datasets_and_callables_from_the_python_api(tmp_path, tok, monkeypatch):
    """TRL's trainers take a datasets.Dataset and reward callables; so does the Python API: the
    rows become a Parquet file named by their content (the same rows: the same file, so a
    resume matches), a callable becomes a module:function spec that loads it back."""
    import datasets

    from rayalign import _config
    from rayalign.config import DPOConfig, OnlineDPOConfig
    from rayalign.demo.task import demo_reward
    from rayalign.rewards.function import load_function

    monkeypatch.setenv("RAYALIGN_DATA_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": "Reverse: a b ->", "chosen": " b a", "rejected": " a b"}] * 4
    base = {"model_name_or_path": "m", "output_dir": str(tmp_path / "out")}
    cfg = _config(DPOConfig, {**base, "train_dataset": datasets.Dataset.from_list(rows), "eval_dataset": rows[:2]})
    assert read_rows(cfg.train_dataset) == rows and read_rows(cfg.eval_dataset) == rows[:2]
    again = _config(DPOConfig, {**base, "train_dataset": datasets.Dataset.from_list(rows)})
    assert again.train_dataset == cfg.train_dataset
    table, _ = validate_file(cfg.train_dataset, tok, SETTINGS)
    assert table.num_rows == 4

    def shorter(prompts, completions, **kwargs):
        return [-float(len(c)) for c in completions]

    online = _config(OnlineDPOConfig, {**base, "train_dataset": [{"prompt": "p"}] * 4,
                                       "reward_funcs": [shorter, demo_reward, lambda prompts, completions, **k: [0.0]]})
    specs = online.reward_funcs
    assert specs[1] == "rayalign.demo.task:demo_reward"
    assert load_function(specs[0], "reward_funcs[0]") is shorter and load_function(specs[2], "x")(["p"], ["c"]) == [0.0]
    with pytest.raises(DataError, match="DatasetDict"):
        _config(DPOConfig, {**base, "train_dataset": datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})})
