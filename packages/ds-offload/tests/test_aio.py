"""Round trips of the async IO engine across sizes, alignments, dtypes, knobs and engines."""

import warnings

import pytest
import torch

from ds_offload import AioConfig, AioError, AsyncIO, _aio_build, aligned_empty

# the C++ engine on each backend (kernel AIO contexts, the blocking-thread pool) and Python
ENGINES = {
    "native-kernel-aio": {"engine": "native", "native_backend": "kernel-aio"},
    "native-threads": {"engine": "native", "native_backend": "threads"},
    "python": {"engine": "python"},
}
KNOBS = [
    {},
    {"single_submit": True},
    {"overlap_events": False, "queue_depth": 2},
    {"block_size": 4096 * 3 + 7, "thread_count": 2, "queue_depth": 2},
    {"use_direct": False},
]
# Sizes in bytes around the 4096-byte O_DIRECT unit and the block size.
SIZES = [0, 1, 4, 4092, 4096, 4100, 3 * 4096 + 7, (1 << 20) - 4, 1 << 20, (1 << 20) + 12]


def _pattern(nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


@pytest.fixture(params=list(ENGINES))
def engine(request):
    return ENGINES[request.param]


@pytest.mark.parametrize(
    "knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default"
)
def test_round_trip_sizes(tmp_path, engine, knobs):
    with AsyncIO(**engine, **knobs) as aio:
        assert aio.engine == engine["engine"]
        assert aio.backend == engine.get("native_backend", "python")
        for i, n in enumerate(SIZES):
            src = aligned_empty(n, torch.uint8)
            src.copy_(_pattern(n, i))
            path = tmp_path / f"f{i}.bin"
            assert aio.pwrite(src, path) == n
            assert path.stat().st_size == n
            dst = aligned_empty(n, torch.uint8)
            dst.fill_(0)
            assert aio.pread(dst, path) == n
            assert torch.equal(dst, src), n


@pytest.mark.parametrize("buf_shift", [0, 4, 512, 4090])
@pytest.mark.parametrize("file_offset", [0, 8, 4096, 4096 * 5 + 20])
def test_unaligned_buffers_and_offsets(tmp_path, engine, buf_shift, file_offset):
    n = 3 * 4096 + 100
    base = aligned_empty(n + buf_shift, torch.uint8)
    src = base[buf_shift:]
    src.copy_(_pattern(n, buf_shift + file_offset))
    path = tmp_path / "x.bin"
    with AsyncIO(**engine, block_size=8192) as aio:
        aio.pwrite(src, path, offset=file_offset)
        assert path.stat().st_size == file_offset + n
        out_base = aligned_empty(n + 3, torch.uint8)
        dst = out_base[3:]  # deliberately misaligned destination
        aio.pread(dst, path, offset=file_offset)
        assert torch.equal(dst, src)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_dtypes_and_shapes(tmp_path, engine, dtype):
    src = (torch.randn(37, 129) * 100).to(dtype)
    with AsyncIO(**engine) as aio:
        aio.pwrite(src, tmp_path / "t.bin")
        dst = torch.empty_like(src)
        aio.pread(dst, tmp_path / "t.bin")
    assert torch.equal(dst, src)


def test_many_async_requests_and_offsets_into_one_file(tmp_path, engine):
    parts = [torch.randn(n) for n in (1, 1024, 5000, 70_000, 3)]
    offsets, off = [], 0
    for p in parts:
        offsets.append(off)
        off += p.numel() * 4
    path = tmp_path / "packed.bin"
    with AsyncIO(**engine, queue_depth=4, block_size=16384) as aio:
        for p, o in zip(parts, offsets):
            aio.async_pwrite(p, path, o)
        assert aio.wait() == len(parts)
        outs = [torch.empty_like(p) for p in parts]
        for t, o in zip(outs, offsets):
            aio.pread(t, path, o, async_op=True)
        assert aio.wait() == len(parts)
        assert aio.outstanding() == 0
    for p, t in zip(parts, outs):
        assert torch.equal(p, t)


def test_sync_call_does_not_lose_async_errors(tmp_path, engine):
    (tmp_path / "short.bin").write_bytes(b"\0" * 10)
    with AsyncIO(**engine) as aio:
        aio.async_pread(torch.empty(1000), tmp_path / "short.bin")
        # the failed async read surfaces at the next synchronous call, not silently never
        with pytest.raises(AioError, match="short.bin"):
            aio.pwrite(torch.ones(4), tmp_path / "other.bin")
        aio.pwrite(torch.ones(4), tmp_path / "other.bin")
        assert aio.wait() == 0


def test_errors_name_the_file(tmp_path, engine):
    with AsyncIO(**engine) as aio:
        with pytest.raises(AioError, match="nope.bin.*No such file"):
            aio.pread(torch.empty(8), tmp_path / "nope.bin")
        (tmp_path / "short.bin").write_bytes(b"\0" * 10)
        with pytest.raises(AioError, match="short.bin.*shorter than the tensor"):
            aio.pread(torch.empty(8), tmp_path / "short.bin")
        with pytest.raises(AioError, match="short.bin"):
            aio.async_pread(torch.empty(8), tmp_path / "short.bin")
            aio.wait()
        # the handle still works after errors
        aio.pwrite(torch.ones(8), tmp_path / "ok.bin")
        out = torch.empty(8)
        aio.pread(out, tmp_path / "ok.bin")
        assert torch.equal(out, torch.ones(8))
        with pytest.raises(ValueError, match="not contiguous"):
            aio.pwrite(torch.ones(4, 4).t(), tmp_path / "x.bin")
        with pytest.raises(ValueError, match="offset"):
            aio.pwrite(torch.ones(4), tmp_path / "x.bin", offset=-1)


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"queue_depth": -1}, {"thread_count": 1.5}])
def test_bad_knobs(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AsyncIO(**bad)


def test_from_config_and_aliases():
    cfg = AioConfig.model_validate(
        {"block_size": 65536, "intra_op_parallelism": 2, "queue_depth": 4}
    )
    with AsyncIO.from_config(cfg, engine="python") as aio:
        assert (aio.block_size, aio.thread_count, aio.queue_depth) == (65536, 2, 4)


def test_forced_fallback_warns_once(monkeypatch, tmp_path):
    monkeypatch.setenv("DS_KERNELS_FORCE_FALLBACK", "aio")
    _aio_build.forget()
    try:
        with pytest.warns(UserWarning, match="op 'aio' uses its pure-Python IO engine"):
            a = AsyncIO()
        assert a.engine == "python"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b = AsyncIO()
        a.close()
        b.close()
    finally:
        monkeypatch.delenv("DS_KERNELS_FORCE_FALLBACK")
        _aio_build.forget()


def test_native_engine_builds_here():
    # The development and CI machines have a C++ compiler; the fallback must not hide a broken
    # source file.
    res = _aio_build.build_library()
    assert res.library is not None, res.reason


def test_aio_is_a_ds_kernels_op():
    """Built through ds-kernels' registry (kind LIBRARY): listed by op_status / ds-report,
    cached in its cache, and the same library AsyncIO loads."""
    import ds_kernels

    res = _aio_build.build_library()
    status = ds_kernels.op_status("aio")
    assert status.compatible and status.built and status.loaded in ("cached", "jit", "prebuilt")
    assert str(res.library) == status.detail
    from ds_offload._aio_op import AIO_OP

    assert AIO_OP.kind is ds_kernels.OpKind.LIBRARY


def test_aligned_empty_is_aligned():
    for n, dt in [(1, torch.float32), (1000, torch.bfloat16), (4096, torch.uint8)]:
        t = aligned_empty(n, dt)
        assert t.data_ptr() % 4096 == 0 and t.numel() == n and t.dtype == dt


def test_short_direct_read_names_the_file_on_every_backend(tmp_path, engine):
    """An aligned (O_DIRECT) read past the end of a file: kernel AIO returns a short transfer,
    which is finished buffered and reported like the blocking engines do."""
    (tmp_path / "short.bin").write_bytes(b"\1" * 10_000)
    buf = aligned_empty(1 << 16, torch.uint8)
    with AsyncIO(**engine, block_size=1 << 14) as aio:
        with pytest.raises(AioError, match="short.bin.*shorter than the tensor"):
            aio.pread(buf, tmp_path / "short.bin")
        assert torch.equal(buf[:10_000], torch.ones(10_000, dtype=torch.uint8))


def _kernel_aio_allowed() -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ctx = ctypes.c_ulong(0)
    if libc.syscall(206, 1, ctypes.byref(ctx)) != 0:  # io_setup (x86-64)
        return False
    libc.syscall(207, ctx)  # io_destroy
    return True


def test_kernel_aio_backend_is_chosen_for_direct_io_and_threads_otherwise():
    import platform

    allowed = platform.machine() == "x86_64" and _kernel_aio_allowed()
    with AsyncIO(engine="native") as aio:
        assert aio.backend == ("kernel-aio" if allowed else "threads")
    with AsyncIO(engine="native", use_direct=False) as aio:
        assert aio.backend == "threads"  # buffered IO would block inside io_submit
    with pytest.raises(ValueError, match="native_backend must be one of"):
        AsyncIO(engine="native", native_backend="uring")
