"""Hostile-user reliability: exclusive writers, checksummed records, damaged and truncated files.

Every damage here must end in a report line or one error line naming the culprit: never a
traceback, a signal, or data that silently changed.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

import lorif_stream as ls
from lorif_stream.store import CorruptBlockError, IndexReader, IndexWriter
from lorif_stream.store import lmdb_store
from lorif_stream.store.format import IndexCorruptError, WriterBusyError
from lorif_stream.store.verify import verify_snapshot
from lorif_stream.store.writer_lock import WriterLock

ROOT = Path(__file__).parents[1]
TASKS = ROOT / "tests" / "tasks" / "mlp_task.py"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(TASKS.parent))
import mlp_task  # noqa: E402
from test_store import random_factors, small_layout, write_index  # noqa: E402


def run_cli(*args, env=None, check=False):
    proc = subprocess.run([sys.executable, "-m", "lorif_stream.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}"
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_line(proc) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("[lorif-stream]")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------ exclusive writers

HOLDER = textwrap.dedent(
    """
    import sys
    from lorif_stream.store import IndexLayout, IndexWriter, LayerShape
    from lorif_stream.store.writer_lock import WriterLock
    mode, path = sys.argv[1], sys.argv[2]
    layout = IndexLayout((LayerShape("a", 4, 3),), c=1, block_size=4)
    if mode == "create":
        held = IndexWriter.create(path, layout, {})
    elif mode == "open":
        held = IndexWriter.open(path)
    else:  # a creator between taking the lock and creating data.mdb
        held = WriterLock.acquire(path)
    print("ready", flush=True)
    sys.stdin.readline()  # hold until the test closes our stdin
    held.close() if hasattr(held, "close") else held.release()
    """
)

TRY_WRITE = textwrap.dedent(
    """
    import sys
    from lorif_stream.store import IndexLayout, IndexWriter, LayerShape, IndexFormatError
    mode, path = sys.argv[1], sys.argv[2]
    try:
        if mode == "create":
            IndexWriter.create(path, IndexLayout((LayerShape("a", 4, 3),), c=1, block_size=4), {}).close()
        else:
            IndexWriter.open(path).close()
    except IndexFormatError as e:
        print(type(e).__name__, e)
        sys.exit(3)
    print("wrote")
    """
)


def hold(mode: str, path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, mode, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def try_write(mode: str, path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY_WRITE, mode, str(path)], capture_output=True, text=True, cwd=ROOT)


def test_a_second_writer_process_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "i"
    write_index(path, small_layout(), [16])
    holder = hold("open", path)
    try:
        refused = try_write("open", path)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert refused.stdout.startswith("WriterBusyError") and f"process {holder.pid}" in refused.stdout
        assert len(refused.stdout.strip().splitlines()) == 1
        # in this process too (flock conflicts between two opens of one process as well)
        with pytest.raises(WriterBusyError, match=rf"index .* is being written by process {holder.pid}: one writer"):
            IndexWriter.open(path)
        # readers are not blocked
        with IndexReader(path) as r, r.snapshot() as s:
            assert s.rows == 16 and verify_snapshot(s).ok
    finally:
        holder.stdin.close()
        assert holder.wait(30) == 0
    assert try_write("open", path).stdout.strip() == "wrote"


def test_a_sigkilled_writer_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "i"
    write_index(path, small_layout(), [16])
    holder = hold("open", path)
    assert try_write("open", path).returncode == 3
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(30)
    assert (path / "writer.lock").read_text().strip() == str(holder.pid)  # the file stays; the lock does not
    assert try_write("open", path).stdout.strip() == "wrote"
    with IndexReader(path) as r, r.snapshot() as s:
        assert s.rows == 16 and verify_snapshot(s).ok


@pytest.mark.parametrize("mode", ["lock", "create"])
def test_two_creators_of_one_new_directory(tmp_path, mode):
    path = tmp_path / "new"
    path.mkdir()
    holder = hold(mode, path)  # "lock": the other creator has not even written data.mdb yet
    try:
        refused = try_write("create", path)
        assert refused.returncode == 3 and f"being written by process {holder.pid}" in refused.stdout, refused.stdout
    finally:
        holder.stdin.close()
        holder.wait(30)
    again = try_write("create", path)
    if mode == "lock":
        assert again.stdout.strip() == "wrote"
    else:
        assert "already holds an index" in again.stdout


def test_an_append_while_another_writes_is_refused_and_the_writer_finishes(tmp_path):
    index = tmp_path / "idx"
    ls.build(mlp_task.first(), index, f=1, rank=1, sketch_rank=4, device="cpu", progress=False)
    args = [sys.executable, "-m", "lorif_stream.cli", "append", "--task", f"{TASKS}:second", "--index",
            str(index), "--device", "cpu", "--batch-size", "2", "--quiet"]
    # the first append holds its first batch at the gate: the second certainly starts mid-write (two
    # appends merely started together overlapped by timing, which a loaded machine could undo)
    gate = tmp_path / "gate"
    env = {**os.environ, "MLP_TASK_GATE": str(gate)}
    writer = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{gate}.waiting").exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path(f"{gate}.waiting").exists(), writer.communicate()
        second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    finally:
        gate.touch()
    _, writer_err = writer.communicate(timeout=300)
    assert writer.returncode == 0, writer_err
    assert second.returncode == 1 and "is being written by process" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    with IndexReader(index) as r, r.snapshot() as s:
        assert s.rows == mlp_task.N_TRAIN and verify_snapshot(s).ok
        assert s.ids(0, s.rows) == [f"ex{i}" for i in range(mlp_task.N_TRAIN)]


# ------------------------------------------------------------------------------ checksummed records

V_NAME, Y_NAME = "curvature/3/attn/V", "sketch/attn/Y"


def state_index(path: Path) -> None:
    write_index(path, small_layout(), [16, 16])
    rng = np.random.default_rng(7)
    with IndexWriter.open(path) as w:
        w.put_state({V_NAME: rng.standard_normal((48, 4)).astype(np.float32),
                     Y_NAME: rng.standard_normal((48, 6)).astype(np.float32)},
                    {"curvature": {"generation": 3, "layers": {"attn": {"damping": 0.25}}}})
        w.update_settings(dict(w.settings, note="some settings"))


def stored_value(path: Path, db: bytes, key: bytes) -> bytes:
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8)
    try:
        with env.begin(db=env.open_db(db, create=False)) as txn:
            return bytes(txn.get(key))
    finally:
        env.close()


def flip_everywhere(path: Path, needle: bytes, pos: int) -> None:
    """XOR one byte of every copy of `needle` in data.mdb (copy-on-write leaves stale copies)."""
    data = bytearray((path / "data.mdb").read_bytes())
    offsets = [m.start() for m in re.finditer(re.escape(needle), bytes(data))]
    assert offsets, needle
    for o in offsets:
        data[o + pos] ^= 0x21
    (path / "data.mdb").write_bytes(bytes(data))


@contextlib.contextmanager
def raw_edit(path: Path):
    """A write transaction of plain LMDB, recorded as our writer would (readers check the commit record)."""
    from lorif_stream.store.integrity import pack_checked_u64

    env = lmdb.open(str(path), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            yield env, txn
            if txn.get(b"commit", db=env.open_db(b"meta", txn=txn)) is not None:
                txn.put(b"commit", pack_checked_u64(b"commit", txn.id()), db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()


def _chunk_key(name: str, i: int) -> bytes:
    return name.encode() + b"\x00" + struct.pack(">I", i)


# (name, db, key, byte to flip inside the value, what verify and the reader say, how a reader reads it)
RECORDS = [
    ("block", b"factors", struct.pack(">HQ", 1, 16), 40, r"layer 'mlp' block at row 16: .*checksum",
     lambda r, s: list(s.blocks())),
    ("id", b"ids", b"r" + struct.pack(">Q", 5), -1, r"ids: id of row 5: checksum mismatch", lambda r, s: s.id_of(5)),
    ("reverse id", b"ids", b"iex-5", 3, r"ids: reverse entry of 'ex-5': checksum mismatch",
     lambda r, s: s.row_of("ex-5")),
    ("array chunk", b"sketch", _chunk_key(V_NAME, 0), 100, rf"array '{V_NAME}' chunk 0: checksum mismatch",
     lambda r, s: s.array(V_NAME)),
    ("array head", b"sketch", V_NAME.encode() + b"\x00head", 12, rf"array '{V_NAME}' head: checksum mismatch",
     lambda r, s: s.array(V_NAME)),
    ("settings", b"meta", b"settings", 12, r"metadata record 'settings': checksum mismatch", None),
    ("state", b"meta", b"state:curvature", 12, r"metadata record 'state:curvature': checksum mismatch",
     lambda r, s: s.state_meta("curvature")),
    ("rows", b"meta", b"rows", 7, r"metadata record 'rows': checksum mismatch", None),
]


@pytest.mark.parametrize("name,db,key,pos,message,read", RECORDS, ids=[r[0] for r in RECORDS])
def test_a_flipped_byte_in_any_record_is_named_by_verify_and_readers(tmp_path, name, db, key, pos, message, read):
    path = tmp_path / "i"
    state_index(path)
    value = stored_value(path, db, key)
    flip_everywhere(path, value, pos % len(value))
    report = ls.verify(path, progress=False)  # the CLI's verify: the walk runs in a child process
    assert not report.ok and any(re.search(message, e) for e in report.errors), report.errors
    if read is None:  # read on opening
        with pytest.raises(CorruptBlockError, match=rf"index {re.escape(str(path))}: {message}"):
            with IndexReader(path) as r, r.snapshot():
                pass
    else:
        with IndexReader(path) as r, r.snapshot() as s, pytest.raises(CorruptBlockError, match=message):
            read(r, s)


def test_a_flipped_layout_is_one_line_and_verify_names_it(tmp_path):
    path = tmp_path / "i"
    state_index(path)
    flip_everywhere(path, stored_value(path, b"meta", b"layout"), 20)
    with pytest.raises(CorruptBlockError, match=r"metadata record 'layout': checksum mismatch"):
        IndexReader(path)
    report = ls.verify(path, progress=False)
    assert report.errors == [f"index {path}: metadata record 'layout': checksum mismatch"]


def test_a_renamed_record_key_is_caught_by_its_checksum(tmp_path):
    """A value moved under another key keeps a valid value crc: the key is in the crc too."""
    path = tmp_path / "i"
    state_index(path)
    with raw_edit(path) as (env, txn):
        meta, ids = env.open_db(b"meta", txn=txn), env.open_db(b"ids", txn=txn)
        txn.put(b"state:curvaturX", txn.get(b"state:curvature", db=meta), db=meta)
        txn.delete(b"state:curvature", db=meta)
        txn.put(b"iex-Z", txn.get(b"iex-5", db=ids), db=ids)
        txn.delete(b"iex-5", db=ids)
    errors = ls.verify(path, progress=False).errors
    assert "metadata record 'state:curvaturX': checksum mismatch" in errors
    assert "ids: reverse entry of 'ex-Z': checksum mismatch" in errors
    assert "ids: id 'ex-5' of row 5 has no reverse entry" in errors
    # a state record or array whose key was damaged is not "absent": the manifest lists it
    assert "metadata record 'state:curvature' is missing, yet the index's manifest lists it (a damaged key)" in errors
    with IndexReader(path) as r, r.snapshot() as s:
        with pytest.raises(CorruptBlockError, match=r"'state:curvature' is missing, yet the index's manifest lists it"):
            s.state_meta("curvature")
        assert s.state_meta("never-stored") is None


def test_an_array_whose_head_key_was_damaged_is_missing_but_listed(tmp_path):
    path = tmp_path / "i"
    state_index(path)
    head = V_NAME.encode() + b"\x00head"
    with raw_edit(path) as (env, txn):
        sketch = env.open_db(b"sketch", txn=txn)
        txn.put(head.replace(b"/V", b"/W"), txn.get(head, db=sketch), db=sketch)
        txn.delete(head, db=sketch)
    errors = ls.verify(path, progress=False).errors
    assert f"array '{V_NAME}' is missing, yet the index's manifest lists it (a damaged key)" in errors
    assert "array 'curvature/3/attn/W' head: checksum mismatch" in errors
    assert f"array '{V_NAME}': chunks without a head (a damaged key?)" in errors
    with IndexReader(path) as r, r.snapshot() as s, pytest.raises(CorruptBlockError, match="manifest lists it"):
        s.array(V_NAME)


# ------------------------------------------------------------------------------ older indexes


def make_legacy(path: Path) -> None:
    """Rewrite an index's records the way format 1 stored them: no frames, no crcs, no commit record."""
    env = lmdb.open(str(path), max_dbs=8)
    meta, ids, sketch = (env.open_db(n) for n in (b"meta", b"ids", b"sketch"))
    with env.begin(write=True) as txn:
        for key, value in list(txn.cursor(db=meta)):
            if value[:4] == b"LRFJ":
                txn.put(key, value[8:], db=meta)
            elif key in (b"rows",):
                txn.put(key, value[:8], db=meta)
        txn.delete(b"commit", db=meta)
        txn.delete(b"manifest", db=meta)
        txn.put(b"format_version", b"1", db=meta)
        for key, value in list(txn.cursor(db=ids)):
            txn.put(key, value[5:] if key[:1] == b"r" else value[:8], db=ids)
        for key, value in list(txn.cursor(db=sketch)):
            if key.endswith(b"\x00head"):
                head = __import__("json").loads(value[8:])
                del head["crc32"]
                txn.put(key, __import__("json").dumps(head).encode(), db=sketch)
    env.close()


def test_an_older_index_without_checksums_still_reads_and_verifies(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    state_index(new)
    state_index(old)
    make_legacy(old)
    assert stored_value(old, b"ids", b"iex-5") == struct.pack(">Q", 5)
    with IndexReader(new) as a, IndexReader(old) as b, a.snapshot() as sa, b.snapshot() as sb:
        assert b.format_version == 1 and a.settings == b.settings and sa.rows == sb.rows == 32
        assert sa.ids(0, 32) == sb.ids(0, 32) and sb.row_of("ex-7") == 7
        np.testing.assert_array_equal(sa.array(V_NAME), sb.array(V_NAME))
        assert sa.state_meta("curvature") == sb.state_meta("curvature")
        for (_, _, fa), (_, _, fb) in zip(sa.blocks(), sb.blocks()):
            for (La, Ra), (Lb, Rb) in zip(fa, fb):
                np.testing.assert_array_equal(La, Lb)
    assert ls.verify(old, progress=False).ok
    # ... and a writer of today adds checksummed records to it; its manifest starts from the keys there
    with IndexWriter.open(old) as w:
        w.append(32, random_factors(np.random.default_rng(0), w.layout, 3), ["x", "y", "z"])
        w.put_state({"sketch/mlp/Y": np.ones((3, 2), np.float32)}, {"sketch": {"k": 2}})
    with IndexReader(old) as r, r.snapshot() as s:
        assert s.rows == 35 and s.ids(30, 35) == ["ex-30", "ex-31", "x", "y", "z"] and verify_snapshot(s).ok
        assert s.manifest() == {"arrays": sorted([V_NAME, Y_NAME, "sketch/mlp/Y"]), "state": ["curvature", "sketch"]}
        assert s.state_meta("curvature") == {"generation": 3, "layers": {"attn": {"damping": 0.25}}}


def test_damaged_json_of_an_older_index_is_one_line_naming_the_record(tmp_path):
    path = tmp_path / "i"
    state_index(path)
    make_legacy(path)
    settings = stored_value(path, b"meta", b"settings")
    flip_everywhere(path, settings, 0)  # '{' -> 'Z'
    with pytest.raises(CorruptBlockError, match=r"metadata record 'settings': not valid JSON \(Expecting value"):
        IndexReader(path)
    assert any("metadata record 'settings': not valid JSON" in e for e in ls.verify(path, progress=False).errors)


def test_verify_checks_ids_both_ways(tmp_path):
    """A damaged id key and a stale reverse entry of an older index (no crcs): found by lookups both ways."""
    path = tmp_path / "i"
    state_index(path)
    make_legacy(path)
    env = lmdb.open(str(path), max_dbs=8)
    ids = env.open_db(b"ids")
    with env.begin(write=True) as txn:
        txn.put(b"iex-Z", txn.get(b"iex-5", db=ids), db=ids)  # the key of ex-5's reverse entry damaged
        txn.delete(b"iex-5", db=ids)
        txn.put(b"ighost", struct.pack(">Q", 3), db=ids)  # a stale reverse entry
    env.close()
    errors = ls.verify(path, progress=False).errors
    assert "ids: id 'ex-5' of row 5 has no reverse entry" in errors
    assert "ids: reverse entry 'ex-Z' -> row 5, but row 5 holds id 'ex-5'" in errors
    assert "ids: reverse entry 'ghost' -> row 3, but row 3 holds id 'ex-3'" in errors
    assert "ids: 33 reverse entries for 32 rows" in errors


# ------------------------------------------------------------------------------ row count and blocks


@pytest.mark.parametrize("legacy", [False, True])
def test_a_row_count_larger_than_the_data_is_reported_and_refused(tmp_path, legacy):
    path = tmp_path / "i"
    state_index(path)
    if legacy:
        make_legacy(path)
    from lorif_stream.store.integrity import pack_checked_u64

    with raw_edit(path) as (env, txn):  # as if a writer of ours had written it, crc and all
        txn.put(b"rows", struct.pack(">Q", 42) if legacy else pack_checked_u64(b"rows", 42),
                db=env.open_db(b"meta", txn=txn))
    errors = ls.verify(path, progress=False).errors
    assert "layer 'attn': blocks cover rows 0..31, the index says 42 rows" in errors
    assert "ids: row 32 has no id" in errors
    with pytest.raises(CorruptBlockError, match=r"claims 42 rows but layer 'attn' has blocks only for rows 0\.\.31: "
                                                r"blocks for rows 32\.\.41 are missing"):
        with IndexReader(path) as r, r.snapshot():
            pass


def test_a_missing_block_in_the_middle_is_not_skipped(tmp_path):
    path = tmp_path / "i"
    write_index(path, small_layout(), [16, 16, 16])
    with raw_edit(path) as (env, txn):
        txn.delete(struct.pack(">HQ", 0, 16), db=env.open_db(b"factors", txn=txn))
    with IndexReader(path) as r, r.snapshot() as s:
        with pytest.raises(CorruptBlockError, match=r"layer 'attn': rows 16\.\.31 have no block"):
            list(s.blocks())
        with pytest.raises(CorruptBlockError, match=r"rows 16\.\.31 have no block"):
            list(s.layer_values(0))
        assert "layer 'attn': rows 16..31 are missing" in verify_snapshot(s).errors


# ------------------------------------------------------------------------------ LMDB's own structures


@pytest.fixture(scope="module")
def mlp_index(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "idx"
    ls.build(mlp_task.full(), path, f=1, rank=1, sketch_rank=4, device="cpu", progress=False)
    return path


def copy_index(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "data.mdb").write_bytes((src / "data.mdb").read_bytes())
    return dst


def test_a_truncated_data_file_is_refused_before_mapping(tmp_path, mlp_index):
    size = (mlp_index / "data.mdb").stat().st_size
    for cut in (size - 1, size - 4096, 3 * 4096, 5000):
        path = copy_index(mlp_index, tmp_path / f"cut{cut}")
        with open(path / "data.mdb", "r+b") as fh:
            fh.truncate(cut)
        message = rf"index {re.escape(str(path))} is truncated: data.mdb has {cut} bytes, LMDB needs (at least )?\d+"
        for opener in (IndexReader, IndexWriter.open):
            with pytest.raises(IndexCorruptError, match=message):
                opener(path)
    # through the CLI: one line, no SIGBUS (run_cli asserts no signal, no traceback)
    verify = run_cli("verify", "--index", path)
    assert verify.returncode == 1 and re.search(message, one_line(verify))
    query = run_cli("query", "--task", f"{TASKS}:full", "--index", path, "--out", tmp_path / "r.jsonl",
                    "--device", "cpu", "--quiet")
    assert query.returncode == 1 and re.search(message, one_line(query))


def _meta_txnids(path: Path) -> list[int]:
    raw = (path / "data.mdb").read_bytes()
    return [struct.unpack_from("<Q", raw, page * 4096 + 144)[0] for page in (0, 1)]


def _set_txnid(path: Path, page: int, txnid: int) -> None:
    with open(path / "data.mdb", "r+b") as fh:
        fh.seek(page * 4096 + 144)
        fh.write(struct.pack("<Q", txnid))


def test_damaged_lmdb_header_pages_do_not_silently_roll_back(tmp_path, mlp_index):
    # a txnid LMDB never writes (wrong parity / not consecutive): refused on opening
    path = copy_index(mlp_index, tmp_path / "a")
    t = _meta_txnids(path)
    newest = int(t[1] > t[0])
    _set_txnid(path, newest, t[newest] ^ 0x40)
    with pytest.raises(IndexCorruptError, match=r"header pages hold transaction ids .* which LMDB never writes"):
        IndexReader(path)
    verify = run_cli("verify", "--index", path)
    assert verify.returncode == 1 and "LMDB never writes" in one_line(verify)
    # the older page made to look newest, consistently: LMDB reads the previous commit as the latest,
    # which the commit record of that state gives away
    path = copy_index(mlp_index, tmp_path / "b")
    t = _meta_txnids(path)
    older = int(t[1] < t[0])
    _set_txnid(path, older, max(t) + 1)
    with pytest.raises(CorruptBlockError, match=rf"LMDB read transaction {max(t) + 1} but the index's last commit "
                                                rf"was {min(t)}"):
        with IndexReader(path) as r, r.snapshot():
            pass
    assert any("a damaged LMDB header page made it pick an older state" in e
               for e in ls.verify(path, progress=False).errors)


def test_a_damaged_lmdb_page_is_one_line_not_an_lmdb_traceback(tmp_path, monkeypatch):
    path = tmp_path / "i"
    write_index(path, small_layout(), [16, 16])
    data = bytearray((path / "data.mdb").read_bytes())
    for m in re.finditer(b"iex-5", bytes(data)):  # every leaf page holding reverse ids: flags made invalid
        data[m.start() // 4096 * 4096 + 10] = 0x40
    (path / "data.mdb").write_bytes(bytes(data))
    # opening walks LMDB's page trees (with pread, not the map) and names the page
    page = rf"LMDB page \d+ \(ids db\): not a branch or leaf page \(header says page \d+, flags 0x40\)"
    with pytest.raises(IndexCorruptError, match=rf"index {re.escape(str(path))} is corrupt: {page}; run `lorif-stream "
                                                rf"verify --index"):
        IndexReader(path)
    verify = run_cli("verify", "--index", path)
    assert verify.returncode == 1 and re.search(f"corrupt: {page}", verify.stderr), verify.stderr
    # a tree too large to walk on opening: LMDB's own error, as one line
    monkeypatch.setattr(lmdb_store, "PAGE_WALK_LIMIT", 0)
    with pytest.raises(IndexCorruptError, match=rf"index {re.escape(str(path))} is corrupt: LMDB says .*MDB_CORRUPTED.*"
                                                r"run `lorif-stream verify --index"):
        with IndexReader(path) as r, r.snapshot() as s:
            s.row_of("ex-5")


def test_an_lmdb_error_reaching_the_cli_is_one_line(monkeypatch, capsys):
    from lorif_stream import cli

    def damaged(*args, **kwargs):
        raise lmdb.CorruptedError("mdb_cursor_get: MDB_CORRUPTED: Located page was wrong type")

    monkeypatch.setattr(cli.cli, "main", damaged)
    monkeypatch.delenv("LORIF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", "--index", "runs/idx"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err == ("lorif-stream: error: index runs/idx is corrupt: LMDB says mdb_cursor_get: MDB_CORRUPTED: Located "
                   "page was wrong type; run `lorif-stream verify --index runs/idx`\n")


SITECUSTOMIZE = """
import os, sys
if os.environ.get("LORIF_TEST_CRASH") and "_child" in " ".join(sys.orig_argv):
    sys.stderr.write("mdb.c:7026: Assertion 'IS_BRANCH(mc->mc_pg[mc->mc_top])' failed in mdb_cursor_sibling()\\n")
    sys.stderr.flush()
    os.abort()
"""


def test_a_crash_inside_the_lmdb_walk_is_a_report_line(tmp_path, monkeypatch):
    """An mdb.c assertion aborts the process it runs in: verify's walk runs in a child for that."""
    path = tmp_path / "i"
    write_index(path, small_layout(), [4])
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LORIF_TEST_CRASH", "1")
    report = ls.verify(path, progress=False)
    assert report.errors == [f"the LMDB walk crashed with signal {int(signal.SIGABRT)} (SIGABRT: mdb.c:7026: Assertion "
                             f"'IS_BRANCH(mc->mc_pg[mc->mc_top])' failed in mdb_cursor_sibling()): the file is damaged"]


# ------------------------------------------------------------------------------ another user's index


def test_a_reader_that_cannot_write_lock_mdb_reads_unregistered_and_keeps_writers_out(tmp_path, monkeypatch, capsys):
    path = tmp_path / "i"
    write_index(path, small_layout(), [16])
    monkeypatch.setattr(lmdb_store, "can_register", lambda p: False)
    lmdb_store._UNREGISTERED_NOTICES.clear()
    with IndexReader(path) as r:
        assert r.rows == 16
    with IndexReader(path) as r, r.snapshot() as s:
        assert s.rows == 16 and verify_snapshot(s).ok
        assert capsys.readouterr().err.count("lock.mdb is not writable by you") == 1  # said once
        refused = try_write("open", path)  # a writer in another process waits for this read
        assert refused.returncode == 3 and "a reader without write access to its lock.mdb" in refused.stdout
    assert try_write("open", path).stdout.strip() == "wrote"
    holder = hold("open", path)
    try:
        with pytest.raises(WriterBusyError, match=rf"being written by process {holder.pid}, and without write access"):
            IndexReader(path)
    finally:
        holder.stdin.close()
        holder.wait(30)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any lock.mdb")
def test_another_users_read_only_index_reads(tmp_path):
    path = tmp_path / "i"
    write_index(path, small_layout(), [16])
    for f in path.iterdir():
        f.chmod(0o444)
    path.chmod(0o555)
    try:
        proc = subprocess.run([sys.executable, "-c", "import sys; from lorif_stream.store import IndexReader; "
                               "r = IndexReader(sys.argv[1]); print(r.rows)", str(path)],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.stdout.strip() == "16" and "lock.mdb is not writable by you" in proc.stderr, proc.stderr
    finally:
        path.chmod(0o755)
