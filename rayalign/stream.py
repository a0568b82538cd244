"""Training data read where it lies and tokenized across the Ray cluster.

A dataset (one file, a directory or glob of shards, a pyarrow URI, a `save_to_disk` dir or a
`datasets.load_dataset` name) is planned on the driver as *pieces*: every JSONL / JSON / CSV
file is one piece, Parquet files and `datasets` datasets are cut into slices of at most
`PIECE_ROWS` rows (their row counts are in their metadata). The driver reads nothing but the
first rows of each file, which it checks (`check_sample`) before any actor starts. Then one
Ray task per piece reads, normalizes and tokenizes it on whichever node has a free CPU
(`tokenize`); the tokenized pieces stay in the object store, are combined into blocks of up to
`BLOCK_BYTES` (on the workers) and become the Ray Dataset the epochs shuffle and
`streaming_split` to the learners (a shuffle's cost grows with the square of the block count). The driver holds a few numbers per
piece. A bad row a task meets fails the run with its file, row and field (or, with
`drop_bad_rows`, is counted); it is found before the first step, so nothing is written.

Tasks rather than a `map_batches` UDF: a piece's task knows its file and the row numbers in
it, so errors name them, and the blocks come back in piece order, which the seeded shuffle
(and with it exact resume) needs to be reproducible.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from rayalign import data as data_lib
from rayalign import storage
from rayalign.data import DataError, DataSource, TokenizeSettings

logger = logging.getLogger("rayalign")

PIECE_ROWS = 8192  # rows per Parquet / datasets piece: a task's work, and a block of the Dataset
SAMPLE_ROWS = 64  # rows of each file the driver checks before anything starts


@dataclass(frozen=True)
class Piece:
    """One task's share of a dataset: rows [start, stop) of one file (stop None: to its end)."""

    name: str  # how errors name the file: its path or URI, or the dataset with config and split
    path: str  # a local path or a URI; for datasets kinds, what load_from_disk / load_dataset take
    fmt: str  # "json" (JSON lines or an array), "csv", "parquet", "disk" (save_to_disk), "hub" (load_dataset)
    start: int = 0
    stop: int | None = None
    config: str | None = None
    split: str | None = None
    columns: tuple[tuple[str, str], ...] = ()


# ----------------------------------------------------------------------------- planning (driver)


def plan(source: str | DataSource, field: str = "dataset") -> list[Piece]:
    """The pieces of a dataset, in row order. Lists files and reads metadata only."""
    src = source if isinstance(source, DataSource) else DataSource(source)
    path, split = src.path, src.split
    if storage.is_uri(path):
        local = storage.local_path(path)
        if local is None:
            return _plan_remote(src, field)
        path = local
    if any(c in path for c in "*?[") and not os.path.exists(path):
        return _plan_files(src, path, sorted(glob.glob(path)), field)
    if split is None and not os.path.exists(path) and ":" in path:
        path, split = path.rsplit(":", 1)
    p = Path(path)
    if not p.exists():
        if p.suffix in data_lib.LOCAL_SUFFIXES or p.is_absolute() or path.startswith((".", "~")):
            raise DataError(f"{field}: file not found: {path}")
        return _plan_dataset(src, path, split, "hub", field)
    if p.is_file() and p.suffix in data_lib.LOCAL_SUFFIXES:
        return _plan_files(src, path, [path], field)
    if p.is_dir() and any(p.glob("*.parquet")):
        return _plan_files(src, path, sorted(str(f) for f in p.glob("*.parquet")), field)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        return _plan_dataset(src, path, split, "disk", field)
    if p.is_dir():
        return _plan_dataset(src, path, split, "hub", field)
    raise DataError(f"{field}: {path}: unknown format (expected .jsonl, .json, .csv, .parquet, a datasets "
                    "save_to_disk directory or a dataset directory load_dataset reads)")


def _plan_remote(src: DataSource, field: str) -> list[Piece]:
    import pyarrow.fs as pafs

    fs, base = storage.resolve(src.path)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{field}: not found: {src.path}")
    if info.type == pafs.FileType.File:
        return _plan_files(src, src.path, [src.path], field)
    scheme = src.path.split("://", 1)[0]
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base))
                   if i.type == pafs.FileType.File and Path(i.path).suffix in data_lib.LOCAL_SUFFIXES)
    return _plan_files(src, src.path, [f"{scheme}://{f}" for f in files], field)


def _plan_files(src: DataSource, name: str, files: list[str], field: str) -> list[Piece]:
    if not files:
        raise DataError(f"{field}: {name} matches no .jsonl / .json / .csv / .parquet file")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) != 1 or not suffixes <= set(data_lib.LOCAL_SUFFIXES):
        raise DataError(f"{field}: {name}: expected data files of one format ({', '.join(data_lib.LOCAL_SUFFIXES)}), "
                        f"got {', '.join(sorted(suffixes))}")
    suffix = suffixes.pop()
    if suffix != ".parquet":
        return [Piece(f, f, "csv" if suffix == ".csv" else "json", columns=src.columns) for f in files]
    import pyarrow.parquet as pq

    pieces = []
    for f in files:
        fs, p = storage.resolve(f)
        try:
            rows = pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{field}: {f} is not a readable Parquet file: {exc}") from None
        pieces += [Piece(f, f, "parquet", lo, min(rows, lo + PIECE_ROWS), columns=src.columns)
                   for lo in range(0, max(rows, 1), PIECE_ROWS)]
    return pieces


def _plan_dataset(src: DataSource, path: str, split: str | None, fmt: str, field: str) -> list[Piece]:
    name = str(DataSource(path, src.config, split))
    ds = _open_dataset(Piece(name, path, fmt, config=src.config, split=split), field)
    return [Piece(name, path, fmt, lo, min(len(ds), lo + PIECE_ROWS), src.config, split, src.columns)
            for lo in range(0, max(len(ds), 1), PIECE_ROWS)]


def _open_dataset(piece: Piece, field: str):
    """The `datasets.Dataset` behind a disk / hub piece (memory-mapped Arrow, not read into memory)."""
    import datasets

    if piece.fmt == "disk":
        ds = datasets.load_from_disk(piece.path)
        if isinstance(ds, datasets.DatasetDict):
            if piece.split is None:
                raise DataError(f"{field}: {piece.path} holds splits {list(ds)}; name one as {piece.path}:<split>")
            ds = ds[piece.split]
        return ds
    try:
        ds = datasets.load_dataset(piece.path, piece.config, split=piece.split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        raise DataError(f"{field}: datasets.load_dataset({piece.path!r}, {piece.config!r}, split={piece.split!r}) "
                        f"failed: {type(exc).__name__}: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"{field}: {piece.path} holds splits {list(ds)}; name one (dataset_train_split / "
                            f"dataset_test_split, or {piece.path}:<split>)")
        ds = next(iter(ds.values()))
    return ds


def fingerprint(pieces: list[Piece]) -> str:
    """A hash of the shard set's contents (the reference cache key covers it): local files by
    content, remote ones by URI, size and modification time, datasets by their Arrow files."""
    h = hashlib.sha256()
    for f in dict.fromkeys((p.path, p.fmt, p.config, p.split) for p in pieces):
        path, fmt = f[0], f[1]
        h.update(json.dumps(f).encode())
        local = None if storage.is_uri(path) and storage.local_path(path) is None else storage.local_path(path)
        if fmt in ("disk", "hub"):
            if os.path.isdir(path):
                for arrow in sorted(Path(path).rglob("*")):
                    if arrow.is_file() and arrow.suffix in (".arrow", ".json", ".parquet", ".jsonl", ".csv"):
                        hash_file(h, arrow)
        elif local is not None:
            hash_file(h, Path(local))
        else:
            fs, p = storage.resolve(path)
            info = fs.get_file_info(p)
            h.update(f"{info.size}:{info.mtime_ns}".encode())
    return h.hexdigest()[:24]


def hash_file(h, path: Path, chunk: int = 1 << 20) -> None:
    """Feed a file's name, size and bytes to hash `h` (read in chunks: flat memory)."""
    h.update(path.name.encode())
    h.update(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


# ----------------------------------------------------------------------------- reading a piece


def read_piece(piece: Piece, field: str, limit: int | None = None) -> list[dict]:
    """The rows of a piece (at most `limit` from its start), columns renamed."""
    stop = piece.stop if limit is None else min(piece.start + limit, piece.stop or piece.start + limit)
    if piece.fmt in ("disk", "hub"):
        ds = _open_dataset(piece, field)
        rows = ds.select(range(piece.start, min(stop, len(ds)))).to_list()
    elif piece.fmt == "parquet":
        rows = _read_parquet_rows(piece, stop)
    else:
        fs, p = storage.resolve(piece.path)
        with fs.open_input_stream(p) as stream:
            if piece.fmt == "json" and limit is not None:
                rows = _head_json_lines(stream, piece.name, field, limit)
            else:
                raw = stream.read()
                rows = _parse(raw, piece, field)[piece.start:stop]
    if piece.columns:
        rows = [data_lib._renamed(r, piece.columns, piece.name, piece.start + i) for i, r in enumerate(rows)]
    return rows


def _parse(raw: bytes, piece: Piece, field: str) -> list[dict]:
    if piece.fmt == "csv":
        import pyarrow.csv as pcsv

        try:
            return pcsv.read_csv(pa.BufferReader(raw)).to_pylist()
        except pa.ArrowInvalid as exc:
            raise DataError(f"{field}: {piece.name} is not valid CSV: {exc}") from None
    return data_lib._parse_json(raw.decode(), piece.name, field)


def _head_json_lines(stream, name: str, field: str, limit: int) -> list[dict]:
    """The first `limit` rows of a JSON-lines file without reading the rest; a JSON array
    (which only parses whole) is read whole."""
    head = b""
    while True:
        block = stream.read(1 << 16)
        head += block
        if not block or head.count(b"\n") > limit:
            break
    if head.lstrip().startswith(b"["):
        return data_lib._parse_json((head + stream.read()).decode(), name, field)[:limit]
    lines = head.split(b"\n")
    if block:  # the last line may be cut off
        lines = lines[:-1]
    return data_lib._parse_json(b"\n".join(lines).decode(), name, field)[:limit]


def _read_parquet_rows(piece: Piece, stop: int | None) -> list[dict]:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    fs, p = storage.resolve(piece.path)
    f = pq.ParquetFile(fs.open_input_file(p))
    stop = f.metadata.num_rows if stop is None else stop
    groups, first, offset = [], None, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if offset + n > piece.start and offset < stop:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    if not groups:
        return []
    table = f.read_row_groups(groups)
    return table.slice(piece.start - first, stop - piece.start).to_pylist()


# ----------------------------------------------------------------------------- checking and tokenizing


@dataclass
class PieceResult:
    """What a piece's task tells the driver (its tokens stay in the object store)."""

    raw_rows: int
    kept: int
    dropped: int  # bad rows (drop_bad_rows) and, for reward data, over-long pairs
    nbytes: int = 0  # of its token table
    dropped_long: int = 0
    with_margin: int = 0
    without_margin: list[int] = field(default_factory=list)  # first few file rows lacking a margin


# kind -> (check and normalize a row, tokenize it): SFT rows, preference pairs (DPO, reward),
# prompt-only rows (online DPO's train and eval prompts)
ROW_FUNCTIONS = {
    "sft": (data_lib.normalize_sft_row, data_lib.tokenize_sft_row),
    "preference": (data_lib.normalize_preference_row, data_lib.tokenize_preference_row),
    "prompt": (data_lib.normalize_prompt_row, data_lib.tokenize_prompt_row),
}


def tokenize_rows(rows: list[dict], piece: Piece, tokenizer, settings: TokenizeSettings, kind: str,
                  drop_bad_rows: bool, reward_max_length: int | None = None) -> tuple[pa.Table, PieceResult]:
    """Normalize and tokenize a piece's rows (TRL-exact, `data.tokenize_*_row`): the token
    table (row_index: the row's number in its file) and its counts. A bad row raises naming
    the file, row and field, or is dropped and counted."""
    norm, tok_fn = ROW_FUNCTIONS[kind]
    out, result = [], PieceResult(raw_rows=len(rows), kept=0, dropped=0)
    for i, row in enumerate(rows):
        index = piece.start + i
        try:
            tokens = tok_fn(norm(row, piece.name, index), tokenizer, settings, piece.name, index)
        except DataError as exc:
            if not drop_bad_rows:
                raise
            result.dropped += 1
            logger.warning("dropping bad row: %s", exc)
            continue
        if reward_max_length is not None and (len(tokens["prompt_ids"]) + max(
                len(tokens["chosen_ids"]), len(tokens["rejected_ids"]))) > reward_max_length:
            result.dropped += 1  # TRL's RewardTrainer filters over-long pairs
            result.dropped_long += 1
            continue
        if kind == "preference":
            if "margin" in tokens:
                result.with_margin += 1
            elif len(result.without_margin) < 5:
                result.without_margin.append(index)
        out.append({"row_index": index, **tokens})
    result.kept = len(out)
    table = pa.Table.from_pylist(out, schema=data_lib._token_schema(kind))
    result.nbytes = table.nbytes
    return table, result


def check_sample(pieces: list[Piece], tokenizer, settings: TokenizeSettings, *, kind: str,
                 drop_bad_rows: bool, field: str, reward_max_length: int | None = None) -> int | None:
    """On the driver, before Ray or any model: the first SAMPLE_ROWS rows of every file,
    normalized and tokenized, so a wrong format or schema fails at once naming file, row and
    field. Returns the number of rows kept when the sample was the whole dataset (small
    data is then checked exactly, its size included), else None."""
    return check_sample_rows(pieces, tokenizer, settings, kind=kind, drop_bad_rows=drop_bad_rows, field=field,
                             reward_max_length=reward_max_length)[0]


def check_sample_rows(pieces: list[Piece], tokenizer, settings: TokenizeSettings, *, kind: str,
                      drop_bad_rows: bool, field: str,
                      reward_max_length: int | None = None) -> tuple[int | None, pa.Table]:
    """`check_sample`, also returning some of the sample's kept token rows: those of the first
    files, up to SAMPLE_ROWS or a little more (row_index counts within each file). Online DPO
    probes its reward functions with a few of them before Ray starts."""
    kept, whole, results, tables = 0, True, [], []
    for piece in pieces:
        if piece.start != 0:  # one check per file: its first piece
            continue
        rows = read_piece(piece, field, limit=SAMPLE_ROWS)
        table, result = tokenize_rows(rows, piece, tokenizer, settings, kind, drop_bad_rows, reward_max_length)
        results.append(result)
        if kept < SAMPLE_ROWS:
            tables.append(table)
        kept += result.kept
        whole = whole and len(rows) < SAMPLE_ROWS  # fewer rows than asked: the file ended
    sample = pa.concat_tables(tables) if tables else data_lib._token_schema(kind).empty_table()
    if whole:
        _check_totals(results, _name(pieces), field, kind, reward_max_length)
        return kept, sample
    _check_margins(results, _name(pieces), kind)  # a mix of rows with and without one shows in the sample
    return None, sample


def _tokenize_piece(piece: Piece, tokenizer_path: str, trust_remote_code: bool, settings: TokenizeSettings,
                    kind: str, drop_bad_rows: bool, reward_max_length: int | None, field: str):
    """The Ray task of one piece: (token table, PieceResult)."""
    from rayalign.models.loading import load_tokenizer

    tokenizer = _tokenizer(tokenizer_path, trust_remote_code, load_tokenizer)
    rows = read_piece(piece, field)
    return tokenize_rows(rows, piece, tokenizer, settings, kind, drop_bad_rows, reward_max_length)


_TOKENIZERS: dict = {}


def _tokenizer(path: str, trust_remote_code: bool, load):
    """One tokenizer per worker process (Ray reuses workers across tasks)."""
    key = (path, trust_remote_code)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load(path, trust_remote_code=trust_remote_code)
    return _TOKENIZERS[key]


BLOCK_BYTES = 128 << 20  # token blocks are combined up to this size (Ray Data's default target block size)


def _offset_rows(table: pa.Table, offset: int) -> pa.Table:
    """File row numbers -> the dataset's row numbers (rows of the files before this one first)."""
    import pyarrow.compute as pc

    return table.set_column(0, "row_index", pc.add(table["row_index"], offset))


def _combine(offsets: list[int], *tables: pa.Table) -> pa.Table:
    """Consecutive pieces' tables as one block, rows numbered across the dataset."""
    return pa.concat_tables([_offset_rows(t, off) for t, off in zip(tables, offsets)]).combine_chunks()


def _blocks(results: list[PieceResult], block_bytes: int) -> list[list[int]]:
    """Consecutive piece numbers grouped into blocks of at most `block_bytes` (a piece larger
    than that is a block of its own). Few large blocks keep each epoch's shuffle and split
    cheap; many pieces keep the tokenizing parallel."""
    groups, size = [[]], 0
    for i, r in enumerate(results):
        if groups[-1] and size + r.nbytes > block_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += r.nbytes
    return groups


@dataclass
class Tokenized:
    """A dataset tokenized across the cluster: a materialized Ray Dataset of token rows
    (row_index: the row's number in the whole dataset, in file order) and its counts."""

    dataset: object  # ray.data.MaterializedDataset
    num_rows: int
    num_dropped: int
    num_raw: int
    seconds: float

    def row_index(self) -> np.ndarray:
        """Every kept row's row_index (8 bytes a row: what the reference cache is checked against)."""
        parts = [b["row_index"] for b in self.dataset.select_columns(["row_index"]).iter_batches(
            batch_size=None, batch_format="numpy")]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


LOCAL_MAX_BYTES = 8 << 20  # data files up to this size are tokenized by the driver (RAYALIGN_LOCAL_TOKENIZE_BYTES)


def data_bytes(pieces: list[Piece]) -> int | None:
    """The data files' total size from their listings (None: unknown, e.g. a hub dataset)."""
    total = 0
    for path, fmt in dict.fromkeys((p.path, p.fmt) for p in pieces):
        if fmt in ("disk", "hub"):
            if not os.path.isdir(path):
                return None
            total += sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
            continue
        fs, p = storage.resolve(path)
        total += fs.get_file_info(p).size or 0
    return total


def tokenize(pieces: list[Piece], *, tokenizer_path: str, trust_remote_code: bool, settings: TokenizeSettings,
             kind: str, drop_bad_rows: bool, field: str, reward_max_length: int | None = None,
             num_proc: int | None = None, local_max_bytes: int | None = None) -> Tokenized:
    """Tokenize every piece in a Ray task (at most `num_proc` at once: TRL's dataset_num_proc;
    None: as many as the cluster's CPUs run), then check the whole-dataset rules (rows left,
    margins on all rows or none). Fails with the first bad row's file/row/field message.
    Data files of at most `local_max_bytes` (default LOCAL_MAX_BYTES) are tokenized here
    instead: a few thousand rows cost less than starting tokenizer workers."""
    import ray

    started = time.perf_counter()
    if local_max_bytes is None:
        local_max_bytes = int(os.environ.get("RAYALIGN_LOCAL_TOKENIZE_BYTES", LOCAL_MAX_BYTES))
    size = data_bytes(pieces)
    if size is not None and size <= local_max_bytes:
        from rayalign.models.loading import load_tokenizer

        tokenizer = _tokenizer(tokenizer_path, trust_remote_code, load_tokenizer)
        table, dropped = tokenize_local(pieces, tokenizer, settings, kind=kind, drop_bad_rows=drop_bad_rows,
                                        field=field, reward_max_length=reward_max_length)
        return Tokenized(dataset=ray.data.from_arrow(table), num_rows=table.num_rows, num_dropped=dropped,
                         num_raw=table.num_rows + dropped, seconds=time.perf_counter() - started)
    remote = ray.remote(num_cpus=1, num_returns=2, max_retries=2)(_tokenize_piece)
    args = (tokenizer_path, trust_remote_code, settings, kind, drop_bad_rows, reward_max_length, field)
    window = num_proc or max(1, int(ray.cluster_resources().get("CPU", 1)))
    tables: list = [None] * len(pieces)
    results: list[PieceResult | None] = [None] * len(pieces)
    pending: dict = {}  # result ref -> piece number
    next_piece, done = 0, 0
    last_log = time.monotonic()
    try:
        while done < len(pieces):
            while next_piece < len(pieces) and len(pending) < window:
                tables[next_piece], ref = remote.remote(pieces[next_piece], *args)
                pending[ref] = next_piece
                next_piece += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                results[i] = _get(ref)
                done += 1
            if time.monotonic() - last_log > 10:
                logger.info("%s: tokenized %d of %d pieces", field, done, len(pieces))
                last_log = time.monotonic()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    combine = ray.remote(num_cpus=0.25)(_combine)
    offsets = _file_offsets(pieces, results)
    refs = [combine.remote([offsets[i] for i in group], *(tables[i] for i in group))
            for group in _blocks(results, BLOCK_BYTES)]
    out = _check_totals(results, _name(pieces), field, kind, reward_max_length)
    out.dataset = ray.data.from_arrow_refs(refs).materialize()
    out.seconds = time.perf_counter() - started
    logger.info("%s: %d rows tokenized in %d pieces across the cluster in %.1fs", field, out.num_rows,
                len(pieces), out.seconds)
    return out


def tokenize_local(pieces: list[Piece], tokenizer, settings: TokenizeSettings, *, kind: str, drop_bad_rows: bool,
                   field: str, reward_max_length: int | None = None) -> tuple[pa.Table, int]:
    """`tokenize` in this process, piece after piece: the same rows, row_index, checks and
    errors, as one table (and the number of rows dropped). For small data and for tests."""
    tables, results = [], []
    for piece in pieces:
        table, result = tokenize_rows(read_piece(piece, field), piece, tokenizer, settings, kind, drop_bad_rows,
                                      reward_max_length)
        tables.append(table)
        results.append(result)
    table = _combine(_file_offsets(pieces, results), *tables)
    return table, _check_totals(results, _name(pieces), field, kind, reward_max_length).num_dropped


def _file_offsets(pieces: list[Piece], results: list[PieceResult]) -> list[int]:
    """What to add to each piece's file row numbers to number rows across the whole dataset:
    the raw rows of every file before its file."""
    offsets, rows_before, base = [], 0, 0
    for piece, result in zip(pieces, results):
        if piece.start == 0:  # a file's first piece: its rows count from here
            base = rows_before
        offsets.append(base)
        rows_before += result.raw_rows
    return offsets


def _name(pieces: list[Piece]) -> str:
    files = list(dict.fromkeys(p.name for p in pieces))
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"


def _get(ref):
    """A task's result; a data error inside it is re-raised as the DataError it was."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from None
        raise


def _check_totals(results: list[PieceResult], name: str, field: str, kind: str,
                  reward_max_length: int | None) -> Tokenized:
    """The whole-dataset rules over the pieces' counts (rows left, margins on all rows or none);
    returns the counts as a Tokenized without its dataset."""
    out = Tokenized(dataset=None, num_rows=sum(r.kept for r in results), num_dropped=sum(r.dropped for r in results),
                    num_raw=sum(r.raw_rows for r in results), seconds=0.0)
    if not out.num_raw:
        raise DataError(f"{field}: {name} has no rows")
    long = sum(r.dropped_long for r in results)
    bad = out.num_dropped - long
    if not out.num_rows:
        if long and not bad:
            raise DataError(f"{field}: {name}: every pair is longer than max_length={reward_max_length} tokens "
                            f"(reward data is filtered, as TRL's RewardTrainer does); raise max_length")
        if kind == "prompt":
            raise DataError(f"{field}: {name} has no usable prompt rows ({out.num_dropped} dropped)")
        raise DataError(f"{field}: {name}: every row is bad ({out.num_dropped} dropped)")
    if bad:
        logger.warning("%s: %s: dropped %d of %d rows (drop_bad_rows=true)", field, name, bad, out.num_raw)
    if long:
        logger.warning("%s: %s: dropped %d of %d pairs longer than max_length=%d tokens (as TRL's "
                       "RewardTrainer)", field, name, long, out.num_raw, reward_max_length)
    _check_margins(results, name, kind)
    return out


def _check_margins(results: list[PieceResult], name: str, kind: str) -> None:
    """A margin on some rows only would be dropped for every batch that mixes them (a batch
    carries a margin only when all its rows have one): refuse, naming rows without."""
    with_margin, kept = sum(r.with_margin for r in results), sum(r.kept for r in results)
    if kind == "preference" and 0 < with_margin < kept:
        missing = [i for r in results for i in r.without_margin][:5]
        raise DataError(f"{name}: field 'margin' is set on {with_margin} rows but missing (or null) on "
                        f"{kept - with_margin}, e.g. rows {missing}: give every row a margin, or none")
