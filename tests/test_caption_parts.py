"""The caption job's pure parts, without Ray: pixel transport, shard assembly, retry and
error classification, the output lease and its takeover from dead runs, reading a shard in
batches (and reading on after a store error), the predictor's failure handling, and
per-row prompts in trol.Captioner."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import botocore.exceptions as bx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.caption.assembly import AssemblyError, ShardAssembly, replace_rows
from pipelines.caption.lease import (OutputLockedError, acquire_lease, dead_on_this_host, process_start_ticks,
                                     read_lease, release_lease)
from pipelines.caption.predictor import classify_model_error
from pipelines.caption.read import ShardReadError, iter_shard_batches
from pipelines.storage.pixels import pack_arrays, unpack_arrays
from pipelines.storage import (Location, NotFoundError, Storage, StorageError, TransientStorageError, describe_error,
                               with_retries)


def test_pixels_round_trip_any_shape_and_dtype() -> None:
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((3, 8, 8)).astype(np.float32),  # today's processor
        None,  # an error row
        rng.integers(0, 255, (5, 3, 4, 4), dtype=np.uint8),  # a stack of 5 tiles, uint8
        rng.integers(0, 255, (1, 3, 4, 4), dtype=np.uint8),  # one tile
        rng.integers(0, 255, (7,), dtype=np.uint8),  # odd byte count: the next row must stay aligned
        rng.standard_normal((2, 3)).astype(np.float64),
    ]
    columns = pack_arrays(arrays)
    table = pa.table(columns)
    for chunked in (table, pa.concat_tables([table.slice(0, 3), table.slice(3)])):
        back = unpack_arrays(chunked)
        assert len(back) == len(arrays)
        for want, got in zip(arrays, back):
            if want is None:
                assert got is None
                continue
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
            assert got.ctypes.data % want.itemsize == 0  # aligned views, no copy needed
    assert table.column("__pixels").null_count == 1


def part(rows: list[int]) -> pa.Table:
    return pa.table({"id": [f"r{r}" for r in rows], "__row": pa.array(rows, pa.int64()),
                     "caption": [f"c{r}" for r in rows]})


def test_assembly_out_of_order_then_sorted() -> None:
    asm = ShardAssembly(6)
    assert not asm.add(part([4, 5]))
    assert not asm.add(part([0, 2]))
    with pytest.raises(AssemblyError, match="only 4 of 6"):
        asm.table()
    assert asm.add(part([3, 1]))
    assert asm.table().column("id").to_pylist() == [f"r{i}" for i in range(6)]


def test_assembly_refuses_duplicates_and_strangers_whole() -> None:
    asm = ShardAssembly(4)
    asm.add(part([0, 1]))
    with pytest.raises(AssemblyError, match="twice"):
        asm.add(part([2, 1]))
    with pytest.raises(AssemblyError, match="twice"):
        asm.add(part([3, 3]))
    with pytest.raises(AssemblyError, match="outside"):
        asm.add(part([4]))
    assert asm.received == 2 and not asm.seen[2]  # a refused batch leaves nothing behind
    assert asm.add(part([2, 3]))


def test_assembly_of_selected_rows_and_replacing_them() -> None:
    asm = ShardAssembly(5, wanted=np.array([1, 3]))
    with pytest.raises(AssemblyError, match="not asked for"):
        asm.add(part([0]))
    assert asm.add(part([3])) is False and asm.add(part([1])) is True
    committed = pa.table({"id": [f"r{i}" for i in range(5)], "caption": ["old"] * 5, "error": [None, "bad", None, "bad", None]})
    fresh = pa.table({"caption": ["new1", "new3"], "error": pa.array([None, None], pa.string()),
                      "__row": pa.array([1, 3], pa.int64())})  # the ids stay as committed
    merged = replace_rows(committed, fresh)
    assert merged.column("caption").to_pylist() == ["old", "new1", "old", "new3", "old"]
    assert merged.column("id").to_pylist() == [f"r{i}" for i in range(5)]
    assert merged.column("error").null_count == 5 and merged.schema == committed.schema


def test_model_errors_are_classified() -> None:
    assert classify_model_error(RuntimeError("CUDA error: an illegal memory access was encountered")) == "device"
    assert classify_model_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) == "memory"
    assert classify_model_error(MemoryError()) == "memory"
    assert classify_model_error(ValueError("expected 3 channels, got 4")) == "row"


def client_error(code: str, status: int) -> bx.ClientError:
    return bx.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_storage_errors_split_transient_from_permanent() -> None:
    for exc in (client_error("SlowDown", 503), client_error("InternalError", 500), client_error("Weird", 502),
                bx.EndpointConnectionError(endpoint_url="http://x"), OSError("AWS Error NETWORK_CONNECTION: refused"),
                ConnectionResetError("reset by peer")):
        assert isinstance(describe_error(exc, "reading x"), TransientStorageError), exc
    assert isinstance(describe_error(client_error("NoSuchKey", 404), "reading x"), NotFoundError)
    for exc in (client_error("AccessDenied", 403), client_error("SignatureDoesNotMatch", 403), OSError("bad footer")):
        err = describe_error(exc, "reading x")
        assert isinstance(err, StorageError) and not isinstance(err, TransientStorageError), exc


def test_retries_back_off_on_transient_errors_only() -> None:
    waits: list[float] = []
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise client_error("SlowDown", 503)
        return "ok"

    assert with_retries(flaky, attempts=5, what="x", sleep=waits.append) == "ok" and waits == [1.0, 2.0]

    def always_down() -> None:
        raise client_error("ServiceUnavailable", 503)

    with pytest.raises(bx.ClientError):
        with_retries(always_down, attempts=3, what="x", sleep=waits.append)
    assert waits == [1.0, 2.0, 1.0, 2.0]

    def denied() -> None:
        raise client_error("AccessDenied", 403)

    with pytest.raises(bx.ClientError):
        with_retries(denied, attempts=5, what="x", sleep=waits.append)
    assert len(waits) == 4  # a permanent error is not retried


def test_lease_refuses_a_second_run_until_expiry_or_force(tmp_path: Path) -> None:
    st, out = Storage(), Location("file", str(tmp_path / "out"))
    acquire_lease(st, out, "run-a", 60, now=1000.0)
    with pytest.raises(OutputLockedError) as err:
        acquire_lease(st, out, "run-b", 60, now=1010.0)
    assert err.value.field == "output" and "run-a" in str(err.value) and "--force" in str(err.value)
    acquire_lease(st, out, "run-a", 60, now=1020.0)  # the holder renews
    acquire_lease(st, out, "run-b", 60, now=1081.0)  # expired: taken over
    assert read_lease(st, out)["run_id"] == "run-b"
    acquire_lease(st, out, "run-c", 60, now=1082.0, force=True)
    release_lease(st, out, "run-b")  # not the holder any more: leaves it
    assert read_lease(st, out)["run_id"] == "run-c"
    release_lease(st, out, "run-c")
    assert read_lease(st, out) is None


def test_lease_is_taken_over_when_its_holder_is_provably_dead(tmp_path: Path) -> None:
    st, out = Storage(), Location("file", str(tmp_path / "out"))
    host = socket.gethostname()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ticks = process_start_ticks(victim.pid)
    acquire_lease(st, out, "run-a", 600, holder={"host": host, "pid": victim.pid, "pid_start": ticks})
    with pytest.raises(OutputLockedError):  # alive: refused
        acquire_lease(st, out, "run-b", 600)
    victim.kill()
    victim.wait()
    took = acquire_lease(st, out, "run-b", 600)
    assert took and "run-a" in took and f"process {victim.pid}" in took and "gone" in took
    assert read_lease(st, out)["run_id"] == "run-b"
    parent = os.getppid()  # alive for as long as this test runs
    alive = {"host": host, "pid": parent, "pid_start": process_start_ticks(parent)}
    assert dead_on_this_host(alive) is None
    assert "later process" in dead_on_this_host({**alive, "pid_start": alive["pid_start"] + 1})  # the pid reused
    assert dead_on_this_host({**alive, "host": "another-host", "pid": victim.pid}) is None  # no proof elsewhere
    acquire_lease(st, out, "run-c", 600, holder={**alive, "host": "another-host", "pid": victim.pid}, force=True)
    with pytest.raises(OutputLockedError, match="--force"):
        acquire_lease(st, out, "run-d", 600)


class TileProcessor:
    """Stands in for a tiling processor: uint8 tile stacks whose count follows the width."""

    image_size = 4

    def prepare_image(self, img: Image.Image) -> np.ndarray:
        tiles = 1 + img.size[0] % 3
        return np.full((tiles, 3, 4, 4), img.size[1], dtype=np.uint8)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, format="PNG")
    return buf.getvalue()


def test_reader_streams_row_groups_and_keeps_per_row_shapes(tmp_path: Path) -> None:
    cells = [png(10 + i, 5 + i) if i % 4 else b"junk" for i in range(23)]
    pq.write_table(pa.table({"id": list(range(23)), "image": pa.array(cells, pa.binary())}), tmp_path / "s.parquet",
                   row_group_size=5)
    kwargs = dict(proc=TileProcessor(), storage=Storage(), image_column="image", num_rows=23,
                  batch_rows=4, max_pixels=10_000, retries=0)
    batches = list(iter_shard_batches(str(tmp_path / "s.parquet"), **kwargs))
    assert all(b.num_rows <= 4 for b in batches)
    table = pa.concat_tables(batches)
    assert table.column("__row").to_pylist() == list(range(23)) and "id" not in table.column_names
    arrays, errors = unpack_arrays(table), table.column("error").to_pylist()
    for i in range(23):
        if i % 4 == 0:
            assert arrays[i] is None and "not a recognized image" in errors[i]
        else:
            assert errors[i] is None and arrays[i].shape == (1 + (10 + i) % 3, 3, 4, 4) and arrays[i][0, 0, 0, 0] == 5 + i

    only = pa.concat_tables(iter_shard_batches(str(tmp_path / "s.parquet"), wanted=np.array([3, 17, 22]), **kwargs))
    assert only.column("__row").to_pylist() == [3, 17, 22]
    with pytest.raises(ShardReadError, match="changed during the run") as err:
        list(iter_shard_batches(str(tmp_path / "s.parquet"), **{**kwargs, "num_rows": 24}))
    assert not err.value.transient
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\0" * 50)
    with pytest.raises(ShardReadError, match="reading shard failed") as err:
        list(iter_shard_batches(str(tmp_path / "bad.parquet"), **kwargs))
    assert not err.value.transient


class FlakyStore(Storage):
    """Local files whose reads fail like a dropped S3 connection after `fail_after` bytes, `times` times."""

    def __init__(self, fail_after: int, times: int):
        super().__init__()
        self.fail_after, self.times, self.opened = fail_after, times, 0

    def filesystem(self, loc):
        store = self

        class Flaky(io.RawIOBase):
            def __init__(self, path):
                self.f, self.read_bytes = open(path, "rb"), 0  # noqa: SIM115

            def readable(self):
                return True

            def seekable(self):
                return True

            def seek(self, *args):
                return self.f.seek(*args)

            def tell(self):
                return self.f.tell()

            def readinto(self, buf):
                if store.times and self.read_bytes > store.fail_after:
                    store.times -= 1
                    raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset")
                n = self.f.readinto(buf)
                self.read_bytes += n
                return n

            def close(self):
                self.f.close()
                super().close()

        class Files:
            def open_input_file(self, path):
                store.opened += 1
                return Flaky(path)

        return Files()


def test_reader_reads_on_after_a_store_error_without_sending_a_row_twice(tmp_path: Path) -> None:
    cells = [png(10 + i % 5, 8) for i in range(40)]
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary())}), tmp_path / "s.parquet", row_group_size=7,
                   compression="none")
    size = (tmp_path / "s.parquet").stat().st_size
    store = FlakyStore(fail_after=size // 2, times=2)
    waits: list[float] = []
    kwargs = dict(proc=TileProcessor(), storage=store, image_column="image", num_rows=40, batch_rows=3,
                  max_pixels=10_000, retries=3, sleep=waits.append)
    rows = pa.concat_tables(iter_shard_batches(str(tmp_path / "s.parquet"), **kwargs)).column("__row").to_pylist()
    assert rows == list(range(40)) and store.opened == 3 and waits == [1.0, 2.0]
    store.times = 5  # more failures than retries: the shard fails, as a store problem
    with pytest.raises(ShardReadError, match="after 3 retries") as err:
        list(iter_shard_batches(str(tmp_path / "s.parquet"), **kwargs))
    assert err.value.transient


class FlakyCaptioner:
    """Runs out of memory on batches over `fits` images; fails on the image holding -1."""

    def __init__(self, fits: int):
        self.fits, self.calls = fits, []

    def caption(self, arrays, prompts, **kw):
        from trol import CaptionResult

        self.calls.append(len(arrays))
        if len(arrays) > self.fits:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        if any(a.min() < 0 for a in arrays):
            raise ValueError("this image cannot be captioned")
        return [CaptionResult(text=f"{p}:c{int(a.max())}", num_tokens=2) for a, p in zip(arrays, prompts)]


def predictor_with(captioner, for_job: bool = True, prompt_column: str | None = None):
    from pipelines.caption.predictor import CaptionPredictor

    pred = CaptionPredictor.__new__(CaptionPredictor)  # the model-loading constructor is not under test
    pred.captioner, pred.prompt, pred.prompt_column, pred.generation = captioner, "p", prompt_column, {}
    pred.give_up_after, pred.for_job, pred.actor, pred.ledger = 1, for_job, "test", None
    return pred


def test_predictor_splits_on_memory_isolates_bad_rows_and_gives_up_on_persistent_oom() -> None:
    arrays = [np.full((3, 2, 2), v, np.float32) for v in (1, 2, -1, 4, 5)]
    errors = [None, None, None, "image is null", None]
    batch = pa.table({"__row": pa.array(range(5), pa.int64()), "q": ["a", "b", "c", "d", None],
                      "error": pa.array(errors, pa.string()),
                      **pack_arrays([a if e is None else None for a, e in zip(arrays, errors)])})
    cap = FlakyCaptioner(fits=2)
    out = predictor_with(cap)(batch)
    assert out.column_names == ["__row", "q", "caption", "error", "num_tokens", "__fatal", "__actor", "__done_at"]
    assert out.column("caption").to_pylist() == ["p:c1", "p:c2", None, None, "p:c5"]
    assert "cannot be captioned" in out.column("error")[2].as_py() and out.column("error")[3].as_py() == "image is null"
    assert cap.calls[0] == 4 and max(cap.calls[1:]) <= 2  # the 4 good-looking rows, then halves
    assert out.column("__fatal").null_count == 5
    # Per-row prompts from a column; a null prompt is that row's error. No job columns in a user's pipeline.
    out = predictor_with(FlakyCaptioner(fits=8), for_job=False, prompt_column="q")(batch)
    assert out.column_names == ["__row", "q", "caption", "error", "num_tokens"]
    assert out.column("caption").to_pylist()[:2] == ["a:c1", "b:c2"] and "is null" in out.column("error")[4].as_py()
    # Out of memory on one image every time: the job fails the shard (fatal), a pipeline gets row errors.
    gave_up = predictor_with(FlakyCaptioner(fits=0))(batch)
    assert gave_up.column("caption").null_count == 5
    assert all("out of memory on a single image" in gave_up.column("__fatal")[i].as_py() for i in (0, 1, 2, 4))
    rows = predictor_with(FlakyCaptioner(fits=0), for_job=False)(batch).column("error").to_pylist()
    assert "out of memory on a single image" in rows[0] and rows[3] == "image is null"


def test_captioner_takes_one_prompt_per_image(tiny_model: Path) -> None:
    from trol import Captioner

    cap = Captioner(str(tiny_model), dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (1, 3, cap.processor.image_size, cap.processor.image_size), dtype=np.uint8)
              for _ in range(3)]
    prompts = ["Describe the image.", "What colour is it? Answer with one word.", "Describe the image."]
    together = cap.caption(images, prompts, max_new_tokens=5)
    alone = [cap.caption([img], p, max_new_tokens=5)[0] for img, p in zip(images, prompts)]
    assert [(r.text, r.num_tokens) for r in together] == [(r.text, r.num_tokens) for r in alone]
    assert [r.text for r in cap.caption(images, prompts[0], max_new_tokens=5)] == [
        cap.caption([img], prompts[0], max_new_tokens=5)[0].text for img in images]
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        cap.caption(images, prompts[:2])


def test_death_ledger_blames_only_the_batch_that_was_running() -> None:
    import shutil
    import uuid

    from pipelines.caption.predictor import DeathLedger

    actor = f"test-{uuid.uuid4().hex}"
    first = DeathLedger(actor)
    try:
        first.running("queued-then-done")
        first.finished()
        first.running("poison")  # ... and the process dies here
        again = DeathLedger(actor)  # the restarted process
        assert again.deaths("poison") == 1 and again.deaths("queued-then-done") == 0
        again.running("poison")
        assert DeathLedger(actor).deaths("poison") == 2  # counts survive every restart
    finally:
        shutil.rmtree(first.folder, ignore_errors=True)


def test_a_batch_is_named_by_its_rows_across_retries() -> None:
    from pipelines.caption.predictor import batch_key

    def batch(rows, value=7):
        return pa.table({"__shard": pa.array([0] * len(rows), pa.int64()), "__row": pa.array(rows, pa.int64()),
                         **pack_arrays([np.full((1, 3, 4, 4), value, np.uint8) for _ in rows])})

    assert batch_key(batch([0, 1])) == batch_key(batch([0, 1]))  # the same rows, sent again
    assert len({batch_key(batch([0, 1])), batch_key(batch([2, 3])), batch_key(batch([0, 1], 8))}) == 3
