"""DeepSpeed module paths that clients import (Megatron-DeepSpeed, Lightning, HF, DeepSpeed's own
tests and scripts), imported the DeepSpeed way and exercised: activation checkpointing with the
tensor-parallel RNG tracker, ``runtime.config``, the offload configs, timers, monitors,
``env_report``, the op builders and the async IO handle, ``ds_to_universal``, the data loader
and ``compression.helper``."""

from __future__ import annotations

import base64
import collections
import importlib
import json
import math
import os
import sys
import time
import types
import warnings

import pytest
import torch
from torch import nn

import ds_all
import ds_ckpt
import ds_kernels


# ------------------------------------------------------------------ activation checkpointing
def test_runtime_checkpointing_is_deepspeed_checkpointing():
    import ds_all.runtime.activation_checkpointing.checkpointing as ds_checkpointing
    from ds_all.runtime.activation_checkpointing import checkpointing

    assert ds_checkpointing is checkpointing is ds_all.checkpointing
    # one module: a setting made through one name is seen through the other
    try:
        ds_checkpointing.partition_activations_in_checkpoint(True)
        assert ds_all.checkpointing._settings["partition_activations"] is True
    finally:
        ds_checkpointing.partition_activations_in_checkpoint(False)


class _TP1:
    """A Megatron-style mpu: tensor-parallel rank 1."""

    def get_tensor_model_parallel_rank(self) -> int:
        return 1

    def get_tensor_model_parallel_group(self) -> None:
        return None


def _draw(seed: int, n: int = 4) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_model_parallel_seed_and_tracker_fork():
    from ds_all.runtime.activation_checkpointing import checkpointing as cp

    tracker = cp.get_cuda_rng_tracker()
    with torch.random.fork_rng():
        cp.configure(mpu_=_TP1())
        try:
            cp.model_parallel_cuda_manual_seed(1234)
            assert torch.equal(torch.rand(4), _draw(1234))  # default generator: the seed
            with tracker.fork():  # model-parallel state: seed + 2718 + tp rank
                assert torch.equal(torch.rand(4), _draw(1234 + 2718 + 1))
            # the default state went on from where it was, the tracked one was advanced
            g = torch.Generator().manual_seed(1234)
            torch.rand(4, generator=g)
            assert torch.equal(torch.rand(4), torch.rand(4, generator=g))
            with tracker.fork():
                g = torch.Generator().manual_seed(1234 + 2718 + 1)
                torch.rand(4, generator=g)
                assert torch.equal(torch.rand(4), torch.rand(4, generator=g))
            cp.model_parallel_reconfigure_tp_seed(7)
            with tracker.fork():
                assert torch.equal(torch.rand(4), _draw(7 + 2718 + 1))
            with pytest.raises(ValueError, match="already exists"):
                tracker.add("other", 1234 + 2718 + 1)
            with pytest.raises(KeyError), tracker.fork("missing"):
                pass
        finally:
            tracker.reset()
            cp._settings["mpu"] = None
            cp._settings["partition_group"] = None


def _dropout_block(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    tracker = ds_all.checkpointing.get_cuda_rng_tracker()
    with tracker.fork():
        return nn.functional.dropout(x * scale, p=0.5, training=True).sum(dim=0)


@pytest.mark.parametrize("how", ["checkpoint", "CheckpointFunction"])
def test_checkpoint_recomputes_with_the_forks_rng_state(how):
    from ds_all.runtime.activation_checkpointing import checkpointing as cp

    tracker = cp.get_cuda_rng_tracker()
    with torch.random.fork_rng():
        tracker.reset()
        tracker.add("model-parallel-rng", 99)
        try:
            start = tracker.get_states()
            x = torch.randn(64, 8, requires_grad=True)
            _dropout_block(x, torch.tensor(2.0)).sum().backward()
            reference = x.grad.clone()
            x.grad = None
            tracker.set_states(dict(start))
            if how == "checkpoint":
                out = cp.checkpoint(_dropout_block, x, scale=torch.tensor(2.0))
            else:
                outputs: list[torch.Tensor] = []
                out = cp.CheckpointFunction.apply(_dropout_block, outputs, x, torch.tensor(2.0))
                assert len(outputs) == 1 and outputs[0] is out
            after_forward = tracker.get_states()["model-parallel-rng"]
            out.sum().backward()
            # the recompute drew the forward's mask (else about half the gradients differ) ...
            assert torch.equal(x.grad, reference)
            # ... and the tracker continues from where the forward left it
            assert torch.equal(tracker.get_states()["model-parallel-rng"], after_forward)
        finally:
            tracker.reset()


# ------------------------------------------------------------------ runtime.config, offload
def test_offload_config_models():
    from ds_all.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
        OffloadDeviceEnum,
    )

    opt = DeepSpeedZeroOffloadOptimizerConfig(device="cpu", pipeline_write=True, ratio=0.5)
    assert opt.device == OffloadDeviceEnum.cpu == "cpu" and opt.pipeline and opt.ratio == 0.5
    assert not DeepSpeedZeroOffloadOptimizerConfig().pipeline
    par = DeepSpeedZeroOffloadParamConfig(device="nvme", nvme_path="/local_nvme")
    assert (par.buffer_count, par.buffer_size, par.max_in_cpu) == (5, 10**8, 10**9)
    assert par.pin_memory and str(par.nvme_path) == "/local_nvme"
    with pytest.raises(ValueError):
        DeepSpeedZeroOffloadOptimizerConfig(device="disk")
    with pytest.raises(ValueError):
        DeepSpeedZeroOffloadOptimizerConfig(ratio=1.5)


_DS_CONFIG = {
    "train_batch_size": 16,
    "gradient_accumulation_steps": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
    "bf16": {"enabled": True},
    "communication_data_type": "fp32",
    "checkpoint": {"tag_validation": "Fail"},
    "aio": {"block_size": 262144, "intra_op_parallelism": 2},
    "csv_monitor": {"enabled": True, "job_name": "run"},
}


def test_runtime_config_deepspeed_attributes(tmp_path):
    from ds_all.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig, DeepSpeedConfigError

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_DS_CONFIG))
    encoded = base64.urlsafe_b64encode(json.dumps(_DS_CONFIG).encode()).decode()
    for source in (_DS_CONFIG, str(path), encoded):
        c = DeepSpeedConfig(source)
        assert (c.global_rank, c.world_size) == (0, 1)
        assert (c.train_batch_size, c.train_micro_batch_size_per_gpu) == (16, 4)
        assert c.gradient_accumulation_steps == 4
        assert c.zero_enabled and c.zero_optimization_stage == 3
        assert c.zero_config.offload_optimizer.device == "cpu"
        assert c.zero_config.offload_param is None
        assert c.bfloat16_config.enabled and not c.float16_config.enabled
        assert c.optimizer_name == "adamw" and c.optimizer_name in DEEPSPEED_OPTIMIZERS
        assert c.optimizer_params == {"lr": 1e-3}
        assert (c.scheduler_name, c.scheduler_params) == ("WarmupLR", {"warmup_num_steps": 10})
        assert c.communication_data_type is torch.float32 and c.gradient_clipping == 1.0
        assert c.checkpoint_tag_validation_enabled and c.checkpoint_tag_validation_fail
        assert c.aio_config["block_size"] == 262144 and c.aio_config["intra_op_parallelism"] == 2
        assert c.monitor_config.enabled and c.monitor_config.csv_monitor.job_name == "run"
        assert c._param_dict == _DS_CONFIG
    with pytest.raises(DeepSpeedConfigError, match="train_batch_size"):
        DeepSpeedConfig({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 3,
                         "gradient_accumulation_steps": 1})  # fmt: skip
    with pytest.raises(DeepSpeedConfigError, match="zero_optimisation"):
        DeepSpeedConfig({"train_batch_size": 1, "zero_optimisation": {}})
    with pytest.raises(ValueError, match="no file of that name exists"):
        DeepSpeedConfig(str(tmp_path / "missing.json"))


def test_aio_config_defaults_and_checks():
    from ds_all.runtime.swap_tensor.aio_config import AIO_DEFAULT_DICT, get_aio_config

    assert get_aio_config({}) == dict(AIO_DEFAULT_DICT)
    assert get_aio_config({})["queue_depth"] == 8
    got = get_aio_config({"aio": {"queue_depth": 32, "thread_count": 4}})
    assert got["queue_depth"] == 32 and got["intra_op_parallelism"] == 4
    with pytest.raises(ValueError, match="queue_dept"):
        get_aio_config({"aio": {"queue_dept": 32}})


# ------------------------------------------------------------------ timers
def test_synchronized_wall_clock_timer(capsys):
    from ds_all.utils.timer import FORWARD_GLOBAL_TIMER, NoopTimer, SynchronizedWallClockTimer

    timers = SynchronizedWallClockTimer()
    fwd = timers(FORWARD_GLOBAL_TIMER)
    assert timers(FORWARD_GLOBAL_TIMER) is fwd and FORWARD_GLOBAL_TIMER == "fwd"
    for _ in range(2):
        fwd.start()
        time.sleep(0.01)
        fwd.stop()
    with pytest.raises(RuntimeError, match="not started"):
        fwd.stop()
    assert 18.0 <= fwd.elapsed(reset=False) < 1000.0
    assert len(fwd.elapsed_records) == 2
    assert 8.0 <= timers.get_mean([FORWARD_GLOBAL_TIMER])["fwd"] / 1000.0 < 500.0
    timers.log(["fwd", "absent"], normalizer=2.0)
    line = capsys.readouterr().out
    assert line.startswith("[Rank 0] time (ms) | fwd: ") and "absent" not in line
    assert fwd.elapsed() == 0.0  # log reset it
    noop = NoopTimer()
    noop("x").start()
    noop("x").stop()
    assert noop("x").elapsed() == 0 and noop.get_timers() == {}


def test_throughput_timer_reports_samples_per_second():
    from ds_all.utils.timer import ThroughputTimer

    logged: list[str] = []
    config = types.SimpleNamespace(enabled=True, synchronized=True)
    timer = ThroughputTimer(config, batch_size=8, start_step=1, steps_per_output=2,
                            logging_fn=logged.append)  # fmt: skip
    assert timer.avg_samples_per_sec() == float("-inf")
    for _ in range(3):
        timer.start()
        time.sleep(0.005)
        timer.stop(global_step=True)
    assert timer.global_step_count == 3 and timer.micro_step_count == 3
    rate = timer.avg_samples_per_sec()
    assert 8 / 1.0 < rate < 8 / 0.004  # two timed steps of >= 5 ms each
    assert len(logged) == 1 and "global_step=2" in logged[0] and "CurrSamplesPerSec" in logged[0]
    off = ThroughputTimer(types.SimpleNamespace(enabled=False, synchronized=False), 8)
    off.start()
    off.stop(global_step=True)
    assert off.global_step_count == 0


# ------------------------------------------------------------------ monitors
def test_monitor_master_writes_csv_events(tmp_path):
    from ds_all.monitor.config import DeepSpeedMonitorConfig, get_monitor_config
    from ds_all.monitor.monitor import MonitorMaster

    assert not DeepSpeedMonitorConfig().enabled
    cfg = get_monitor_config({"csv_monitor": {"enabled": True, "output_path": str(tmp_path),
                                              "job_name": "job"}})  # fmt: skip
    master = MonitorMaster(cfg)
    assert master.enabled and master.csv_monitor is not None and master.tb_monitor is None
    master.write_events([("Train/Samples/train_loss", 1.5, 4), ("Train/Samples/lr", 0.1, 4)])
    master.write_events([("Train/Samples/train_loss", 1.25, 8)])
    with open(tmp_path / "job" / "Train_Samples_train_loss.csv") as f:
        rows = f.read().split()
    assert rows[1:] == ["4,1.5", "8,1.25"]
    with pytest.warns(UserWarning, match="comet monitoring is not supported"):
        MonitorMaster(get_monitor_config({"comet": {"enabled": True, "project": "p"}}))
    with pytest.raises(ValueError, match="job_nam"):
        get_monitor_config({"tensorboard": {"job_nam": "x"}})


# ------------------------------------------------------------------ env_report, op builders
def test_env_report_main_prints_ds_report(capsys):
    from ds_all.env_report import main

    main()
    out = capsys.readouterr().out
    assert out.startswith("ds-report") and "cpu_optim" in out and "[packages] from ds-all" in out
    main(hide_operator_status=True, hide_errors_and_warnings=True)
    assert "cpu_optim" not in capsys.readouterr().out


def test_op_builders_probe_and_load_ds_kernels_ops():
    import ds_all.ops
    from ds_all.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder, OpBuilder
    from ds_all.ops.op_builder.all_ops import ALL_OPS

    assert set(ALL_OPS) == {"async_io", "cpu_adam", "cpu_adagrad", "cpu_lion", "fused_adam",
                            "fused_lamb", "fused_lion", "quantizer"}  # fmt: skip
    compatible = ds_all.ops.__compatible_ops__
    assert compatible["cpu_adam"] is ds_kernels.op_status("cpu_optim").compatible
    assert compatible["fused_lion"] is ds_kernels.op_status("fused_optim").compatible
    assert CPUAdamBuilder().NAME == "cpu_adam" and CPUAdamBuilder.BUILD_VAR == "DS_BUILD_CPU_ADAM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ds_kernels.KernelBuildWarning)
        cpu = CPUAdamBuilder().load()
        assert cpu.op is ds_kernels.load("cpu_optim")
        assert FusedAdamBuilder().load().op is ds_kernels.load("fused_optim")
    assert cpu.backend is cpu.op.backend  # ds_kernels' attributes pass through
    with pytest.raises(AttributeError, match="create_adam.*DeepSpeedCPUAdam"):
        cpu.create_adam(0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, True)
    assert OpBuilder.is_rocm_pytorch() is (torch.version.hip is not None)

    class Missing(OpBuilder):
        NAME = "not_here"
        OP = "not_here"

    missing = Missing()
    assert missing.is_compatible() is False and "not registered" in missing.error_log


def test_async_io_builder_handle_round_trip(tmp_path):
    from ds_all.ops.aio import AsyncIOBuilder
    from ds_all.runtime.swap_tensor.utils import swap_in_tensors, swap_out_tensors

    aio = AsyncIOBuilder().load()
    h = aio.aio_handle(block_size=8192, queue_depth=4, single_submit=False,
                       overlap_events=True, intra_op_parallelism=2)  # fmt: skip
    assert (h.get_block_size(), h.get_queue_depth(), h.get_intra_op_parallelism()) == (8192, 4, 2)
    assert h.get_alignment() == 4096  # O_DIRECT's, as ds_offload aligns its buffers
    buf = h.new_cpu_locked_tensor(4096, torch.empty(0, dtype=torch.float32))
    assert buf.numel() == 4096 and buf.dtype == torch.float32
    buf.copy_(torch.arange(4096, dtype=torch.float32))
    path = str(tmp_path / "t.bin")
    assert h.sync_pwrite(buf, path) >= 1
    back = torch.zeros_like(buf)
    assert h.async_pread(back, path) == 0
    assert h.wait() >= 1 and torch.equal(back, buf)
    back.zero_()
    assert h.pread(back, path, True, False) >= 1 and torch.equal(back, buf)  # validate=True
    assert h.write(buf, path, True) >= 1  # written, re-read and compared
    other = buf.clone()
    other[0] = -1.0
    with pytest.raises(RuntimeError, match="differs"):  # what validate raises on a mismatch
        aio._check_same(other, path, 0)
    with pytest.raises(ValueError, match="synchronous"):
        h.pwrite(buf, path, True, True)
    paths = [str(tmp_path / f"s{i}.bin") for i in range(2)]
    swap_out_tensors(h, [buf, buf * 2], paths)
    h.wait()
    got = [torch.empty_like(buf) for _ in paths]
    swap_in_tensors(h, got, paths)
    h.wait()
    assert torch.equal(got[0], buf) and torch.equal(got[1], buf * 2)


# ------------------------------------------------------------------ ds_to_universal
def _deepspeed_zero2_checkpoint(tag_dir: str) -> dict[str, torch.Tensor]:
    """A one-rank DeepSpeed ZeRO-2 checkpoint as DeepSpeed lays it out, its keys and file names
    spelled with ``deepspeed.checkpoint``'s constants (so the conversion below checks them
    against the files ds-ckpt's importer reads); returns the fp32 masters and the Adam moment
    by name."""
    from ds_all import checkpoint as C

    os.makedirs(tag_dir)
    w, b = torch.randn(2, 3), torch.randn(2)
    flat = torch.cat([w.reshape(-1), b])
    moment = torch.randn(8)
    shapes = collections.OrderedDict(w=torch.Size([2, 3]), b=torch.Size([2]))
    torch.save({"module": {"w": w.bfloat16(), "b": b.bfloat16()}, C.PARAM_SHAPES: [shapes],
                C.BUFFER_NAMES: [], "global_steps": 5},
               os.path.join(tag_dir, f"{C.MODEL_FILE_PREFIX}00{C.MODEL_FILE_SUFFIX}"))  # fmt: skip
    osd = {C.ZERO_STAGE: 2, C.PARTITION_COUNT: 1, C.SINGLE_PARTITION_OF_FP32_GROUPS: [flat],
           C.BASE_OPTIMIZER_STATE: {"state": {0: {"exp_avg": moment, "exp_avg_sq": moment.abs(),
                                                  "step": torch.tensor(5.0)}},
                                    C.PARAM_GROUPS: [{"lr": 0.1, "params": [0]}]}}  # fmt: skip
    torch.save({C.OPTIMIZER_STATE_DICT: osd},
               os.path.join(tag_dir, f"{C.ZERO_FILE_PREFIX}0_{C.MODEL_FILE_PREFIX}00"
                                     f"{C.OPTIM_FILE_SUFFIX}"))  # fmt: skip
    return {"w": w, "b": b, "optimizer.exp_avg.b": moment[6:]}


def test_checkpoint_constants_are_deepspeeds_names():
    # the names Megatron-DeepSpeed imports from deepspeed.checkpoint at module load
    from ds_all.checkpoint import (
        ORIGINAL_VOCAB_SIZE,
        PADDED_VOCAB_SIZE,
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        constants,
    )

    assert UNIVERSAL_CHECKPOINT_INFO == "universal_checkpoint_info"
    assert (UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE) == (
        "universal_checkpoint_version", 0.4)  # fmt: skip
    assert (ORIGINAL_VOCAB_SIZE, PADDED_VOCAB_SIZE) == ("original_vocab_size", "padded_vocab_size")
    assert constants.BF16_ZERO_FILE_PREFIX == "bf16_zero_pp_rank_"
    assert "FP32_FLAT_GROUPS" in constants.__all__ and "annotations" not in constants.__all__


def test_ds_to_universal_converts_a_deepspeed_zero_checkpoint(tmp_path, capsys):
    from ds_all.checkpoint.ds_to_universal import main, parse_arguments

    expected = _deepspeed_zero2_checkpoint(str(tmp_path / "global_step5"))
    (tmp_path / "latest").write_text("global_step5")  # DeepSpeed's pointer, kept as it was
    out = str(tmp_path / "global_step5_universal")
    main(parse_arguments(["--input_folder", str(tmp_path / "global_step5"),
                          "--output_folder", out, "--num_extract_workers", "2"]))  # fmt: skip
    assert "Universal checkpoint" in capsys.readouterr().out
    for name, want in expected.items():
        assert torch.equal(ds_ckpt.load_tensor(str(tmp_path), name, "global_step5_universal"), want)
    assert (tmp_path / "latest").read_text() == "global_step5"
    assert (tmp_path / "latest_universal").read_text() == "global_step5_universal"
    with pytest.raises(ds_ckpt.CheckpointError, match="not a ZeRO checkpoint|optim_states"):
        os.makedirs(tmp_path / "empty")
        main(parse_arguments(["--input_folder", str(tmp_path / "empty"),
                              "--output_folder", str(tmp_path / "x")]))  # fmt: skip


# ------------------------------------------------------------------ data loader, compression
def test_deepspeed_data_loader_draws_like_deepspeed():
    from torch.utils.data import DistributedSampler

    from ds_all.runtime.dataloader import DeepSpeedDataLoader

    data = list(range(11))
    starts: list[int] = []
    timer = types.SimpleNamespace(start=lambda: starts.append(1))
    loader = DeepSpeedDataLoader(data, batch_size=2, pin_memory=False, local_rank=0,
                                 tput_timer=timer, num_local_io_workers=0,
                                 data_parallel_world_size=2, data_parallel_rank=1)  # fmt: skip
    order = list(DistributedSampler(data, num_replicas=2, rank=1))
    assert len(loader) == math.ceil(len(order) / 2) == 3
    batches = [b.tolist() for b in loader]
    assert batches == [order[i : i + 2] for i in range(0, len(order), 2)]
    assert len(starts) == 4  # before each of the 3 batches and the exhausting call
    assert [b.tolist() for b in loader] == batches  # same order each epoch unless set_epoch
    loader.data_sampler.set_epoch(1)
    assert [b.tolist() for b in loader] != batches
    single = DeepSpeedDataLoader(data, batch_size=4, pin_memory=False, local_rank=-1,
                                 tput_timer=None, num_local_io_workers=0,
                                 dataloader_drop_last=True)  # fmt: skip
    got = sorted(x for b in single for x in b.tolist())
    assert len(single) == 11 // (4 * single.device_count) and len(got) == len(single) * 4
    assert set(got) <= set(data)


def test_compression_helper_and_module_utils():
    sys.modules.pop("ds_all.compression.helper", None)
    with pytest.warns(FutureWarning, match="module_utils"):
        helper = importlib.import_module("ds_all.compression.helper")
    from ds_all.utils.module_utils import recursive_getattr, recursive_setattr

    assert helper.recursive_setattr is recursive_setattr
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    assert recursive_getattr(model, "1.1") is model[1][1]
    new = nn.Linear(3, 4)
    recursive_setattr(model, "1.1", new)
    assert model[1][1] is new and dict(model.named_modules())["1.1"] is new
    assert recursive_getattr(model, "0.weight").shape == (3, 2)


def test_pipeline_engine_path_is_the_engine_initialize_builds():
    import ds_all._pipe_engine
    from ds_all.runtime.pipe.engine import PipelineEngine

    assert PipelineEngine is ds_all._pipe_engine.PipelineEngine
    assert ds_all.runtime.pipe.engine.PipelineEngine is PipelineEngine
