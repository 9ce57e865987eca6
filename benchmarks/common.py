"""Shared machinery of the benchmark scripts: configuration, providers, timing, memory, ceilings,
result rows.

Every ``bench_*.py`` script describes one op family as :class:`OpBench` objects (shapes, inputs,
the eager formula peers use, the bytes a fused kernel must move) and hands them to
:func:`parametrize`; the test it runs for each case is :func:`run_case`.  Everything that depends on
the machine (which backends exist, which device, the measured ceilings) is decided here, at run
time, so a backend that lands later is benchmarked without touching the scripts.

Timing
    GPU: CUDA events through ``triton.testing.do_bench`` (warm-up first, L2 flushed before every
    call, the median); ops whose kernels take microseconds are also replayed from a CUDA graph
    (``do_bench_cudagraph``), which removes the launch overhead and gives the GPU time alone.
    CPU: wall-time median of ``pytest-benchmark``'s pedantic rounds (one warm-up call first).
Peak memory
    Extra memory above the inputs, which are allocated before the measurement.  GPU:
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.  CPU: growth of the
    process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` before the
    call), after ``malloc_trim`` has handed freed heap memory back to the OS.
Ceilings
    The device's copy bandwidth (``dst.copy_(src)``, bytes read + written per second) and a bf16
    (and fp32) matmul rate are measured in the same run; each kernel's achieved bandwidth is the
    op's minimum traffic (``OpBench.floor_bytes``) over its time, also given as a percentage of the
    copy bandwidth.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import rlhf_kernels  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False

MODES = ("forward", "backward", "full")
PEER_PROVIDERS = ("eager", "torch_compile", "liger")
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    device: str = "cpu"          # "cpu" or "cuda"
    quick: bool = False          # tiny shapes, few rounds: proves the scripts run, numbers are noise
    threads: int | None = None   # torch.set_num_threads on CPU (None: leave torch's default)
    results_dir: Path = DEFAULT_RESULTS_DIR
    run_id: str = ""
    record: bool = True          # append rows to the results files
    skip_providers: tuple[str, ...] = ()
    only_providers: tuple[str, ...] = ()
    ceilings: dict = field(default_factory=dict)  # metric -> value, measured once per run

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def default_device() -> str:
    try:
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def apply_threads(cfg: Config) -> None:
    if cfg.device == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)


# ------------------------------------------------------------------------------------------------
# environment description carried by every row


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except Exception:
        return ""


def environment(cfg: Config) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if cfg.device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "run_id": cfg.run_id,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": cfg.device,
        "device_name": name,
        "threads": torch.get_num_threads() if cfg.device == "cpu" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "rlhf_kernels": rlhf_kernels.__version__,
        "git": _git_commit(),
        "host": platform.node(),
        "quick": cfg.quick,
        # the 1-minute load average when the rows were written: CPU timings on a shared machine
        # are only comparable inside one run
        "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def device_slug(env: dict) -> str:
    if env["device"] == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")


class Recorder:
    """Appends result rows (one JSON object per line) to ``<results_dir>/<device>.jsonl``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.env = environment(cfg)
        self.path = Path(cfg.results_dir) / f"{device_slug(self.env)}.jsonl"

    def row(self, **fields) -> dict:
        row = dict(self.env)
        row.update(fields)
        if self.cfg.record:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        return row


# ------------------------------------------------------------------------------------------------
# timing and memory


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _do_bench(fn, warmup, rep):
    import triton.testing as tt

    try:
        return float(tt.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # older triton without return_mode
        return float(tt.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])


def _do_bench_cudagraph(fn, rep):
    import triton.testing as tt

    try:
        return float(tt.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except TypeError:
        return float(tt.do_bench_cudagraph(fn, rep=rep, quantiles=[0.5])[0])


def time_gpu(fn: Callable[[], object], cfg: Config, graph: bool) -> dict:
    """{"time_ms": CUDA-event median incl. launch overhead, "graph_time_ms": replay median or None}."""
    warmup, rep = (5, 20) if cfg.quick else (20, 80)
    out = {"time_ms": _do_bench(fn, warmup, rep), "graph_time_ms": None, "graph_error": None}
    if graph:
        try:
            out["graph_time_ms"] = _do_bench_cudagraph(fn, rep)
        except Exception as exc:  # not capturable (host sync, CPU work): say why, keep going
            out["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            torch.cuda.synchronize()
    return out


def time_cpu(fn: Callable[[], object], cfg: Config, benchmark=None, once: float | None = None) -> dict:
    """Wall-time median in ms.  ``once``: seconds the warm-up call took (measured here if None);
    it sets the number of rounds (at least 3, about 0.5 s in all)."""
    if once is None:
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
    budget = 0.05 if cfg.quick else 0.5
    rounds = 2 if cfg.quick else int(min(20, max(3, budget / max(once, 1e-6))))
    if benchmark is not None and not getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        stats = benchmark.stats.stats
        return {"time_ms": stats.median * 1e3, "rounds": rounds}
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"time_ms": statistics.median(times) * 1e3, "rounds": rounds}


_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            # Not mallopt(M_MMAP_THRESHOLD): pinning it makes every large allocation fault in fresh
            # pages, which slows the eager providers (many temporaries) far below real use.
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    return _libc


def _status_kb(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_extra_mb(fn: Callable[[], object]) -> float | None:
    """Growth of the peak RSS during one call of ``fn``, in MB; None where it cannot be measured."""
    libc = _glibc()
    gc.collect()
    if libc:
        # Give freed heap memory back to the OS first, so that reusing it during the call shows as
        # RSS growth instead of hiding in memory the process already holds.
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM")
    del out
    if base is None or peak is None:
        return None
    return max(0, peak - base) / 1024.0


def gpu_peak_extra_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base) / 2**20


# ------------------------------------------------------------------------------------------------
# device ceilings


def measure_ceilings(cfg: Config) -> dict:
    """Copy bandwidth (GB/s, read + write) and matmul rates (TFLOP/s) of this device, measured now."""
    dev = cfg.torch_device
    out = {}
    if cfg.device == "cuda":
        timer = lambda f: _do_bench(f, 10, 50)  # noqa: E731
        n_bytes, n = ((1 << 28) if cfg.quick else (1 << 30)), 8192
    else:
        timer = lambda f: time_cpu(f, cfg)["time_ms"]  # noqa: E731
        n_bytes, n = ((1 << 24) if cfg.quick else (1 << 28)), (256 if cfg.quick else 1024)
    out["copy_bandwidth_gbps"] = 2 * n_bytes / (_time_copy(n_bytes, dev, timer) * 1e-3) / 1e9
    for dtype in (torch.bfloat16, torch.float32):
        out[f"matmul_{dtype_str(dtype)}_tflops"] = 2 * n**3 / (_time_matmul(n, dtype, dev, timer) * 1e-3) / 1e12
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return out


def _time_copy(n_bytes, dev, timer) -> float:
    src = torch.rand(n_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return timer(lambda: dst.copy_(src))


def _time_matmul(n, dtype, dev, timer) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    return timer(lambda: a @ b)


CEILING_UNITS = {"copy_bandwidth_gbps": "GB/s", "matmul_bfloat16_tflops": "TFLOP/s", "matmul_float32_tflops": "TFLOP/s"}


def record_ceilings(cfg: Config, rec: Recorder) -> dict:
    values = measure_ceilings(cfg)
    for metric, value in values.items():
        rec.row(op="_device", provider="-", shape={}, shape_str="-", dtype="-", mode="-",
                metric=metric, value=value, unit=CEILING_UNITS.get(metric, ""))
    return values


# ------------------------------------------------------------------------------------------------
# op descriptions and providers


@dataclass
class Inputs:
    args: dict                       # name -> tensor (inputs of the op)
    grad_names: tuple[str, ...] = () # the tensors the loss is differentiated against
    mask: torch.Tensor | None = None # where outputs are compared (None: everywhere)


@dataclass
class OpBench:
    """One op of a family file.

    ``call_backend(inputs, backend)``, ``eager(inputs)`` and ``compiled_fn()`` (returning a function
    of ``inputs``) give the op's primary output: the tensor that is differentiated in the backward
    modes and compared against the reference backend.
    """

    op: str
    shapes: Callable[[Config], list[dict]]
    dtypes: Callable[[Config], list[torch.dtype]]
    make_inputs: Callable[[dict, torch.dtype, torch.device], Inputs]
    call_backend: Callable[[Inputs, str], object]
    eager: Callable[[Inputs], object]
    floor_bytes: Callable[[dict, torch.dtype, str], int]
    modes: tuple[str, ...] = MODES
    compiled_fn: Callable[[], Callable[[Inputs], object]] | None = None
    compile_skip_reason: str | None = None
    liger_fn: Callable[[], Callable[[Inputs], object]] | None = None  # built only where installed
    liger_skip_reason: str | None = "Liger-Kernel has no kernel for this op"
    small: bool = False              # microsecond kernels: also time CUDA graph replays on GPU
    outputs: Callable[[object], tuple] = lambda out: (out,)  # the tensors to compare
    rtol: float = 1e-3
    atol: float = 1e-3
    label: str = ""                  # row label where a family benchmarks one op in two ways
    provider_tol: dict = field(default_factory=dict)  # provider -> (rtol, atol) overriding the above
    # Peer libraries' own functions for this op: provider -> (module that must import, builder of
    # the provider function); skipped with the reason where the module is not installed.
    peers: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.label or self.op


def shape_str(shape: dict) -> str:
    return "x".join(f"{k}={v}" for k, v in shape.items())


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def providers(bench: OpBench, cfg: Config, dtype: torch.dtype) -> dict[str, str | None]:
    """{provider: None if it runs here, else the reason it is skipped}; backends first."""
    out: dict[str, str | None] = {}
    for name, reason in rlhf_kernels.available_backends(bench.op, cfg.device, dtype).items():
        if reason is None and name == "triton" and cfg.device == "cpu":
            reason = "Triton on CPU tensors runs only in the interpreter; its timings mean nothing"
        out[name] = reason
    out["eager"] = None
    out["torch_compile"] = bench.compile_skip_reason if bench.compiled_fn is None else None
    if bench.liger_fn is None:
        out["liger"] = bench.liger_skip_reason
    elif cfg.device != "cuda":
        out["liger"] = "Liger-Kernel's Triton kernels run on CUDA tensors only"
    elif not _liger_installed():
        out["liger"] = "Liger-Kernel (liger_kernel) is not installed"
    else:
        out["liger"] = None
    for name, (module, _) in bench.peers.items():
        out[name] = None if _importable(module) else f"{module} is not importable here"
    for name in list(out):
        if cfg.only_providers and name not in cfg.only_providers:
            out[name] = out[name] or "not selected (--providers)"
        if name in cfg.skip_providers:
            out[name] = out[name] or "deselected (--skip-providers)"
    return out


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # not installed, or its own imports fail (a peer's optional dependency)
        return False
    return True


_compiled_cache: dict = {}
_liger_cache: dict = {}
_peer_cache: dict = {}


def provider_fn(bench: OpBench, provider: str) -> Callable[[Inputs], object]:
    if provider == "eager":
        return bench.eager
    if provider == "torch_compile":
        # The "backward" mode replays one graph (retain_graph=True), which compiled backwards with
        # donated buffers refuse; donation only lets the backward reuse saved buffers in place.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        key = bench.name
        if key not in _compiled_cache:
            _compiled_cache[key] = bench.compiled_fn()
        return _compiled_cache[key]
    if provider == "liger":
        if bench.name not in _liger_cache:
            _liger_cache[bench.name] = bench.liger_fn()
        return _liger_cache[bench.name]
    if provider in bench.peers:
        key = (bench.name, provider)
        if key not in _peer_cache:
            _peer_cache[key] = bench.peers[provider][1]()
        return _peer_cache[key]
    return lambda inp: bench.call_backend(inp, provider)


@dataclass
class Case:
    bench: OpBench
    shape: dict
    dtype: torch.dtype
    mode: str
    provider: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.bench.name}-{shape_str(self.shape)}-{dtype_str(self.dtype)}-{self.mode}-{self.provider}"


def cases(benches: list[OpBench], cfg: Config) -> list[Case]:
    out = []
    for bench in benches:
        for dtype in bench.dtypes(cfg):
            avail = providers(bench, cfg, dtype)
            for shape in bench.shapes(cfg):
                for mode in bench.modes:
                    for prov, reason in avail.items():
                        out.append(Case(bench, shape, dtype, mode, prov, reason))
    return out


# ------------------------------------------------------------------------------------------------
# running one case


def _grad_out(out: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device=out.device).manual_seed(1)
    return torch.rand(out.shape, generator=gen, device=out.device, dtype=out.dtype) + 0.5


def _check_close(case: Case, got, want, mask) -> None:
    got_t = case.bench.outputs(got)
    want_t = case.bench.outputs(want)
    for i, (g, w) in enumerate(zip(got_t, want_t)):
        g = g.detach().float()
        w = w.detach().float()
        if mask is not None and g.shape == mask.shape:
            g, w = g[mask], w[mask]
        rtol, atol = case.bench.provider_tol.get(case.provider, (case.bench.rtol, case.bench.atol))
        if not torch.allclose(g, w, rtol=rtol, atol=atol):
            err = (g - w).abs().max().item()
            raise AssertionError(
                f"{case.id}: output {i} of {case.provider} differs from the reference backend "
                f"(max abs error {err:.3g}); a benchmark of a different computation is meaningless"
            )


def run_case(case: Case, cfg: Config, rec: Recorder, benchmark=None) -> list[dict]:
    """Check the provider against the reference backend, then time it and measure its peak memory."""
    import pytest

    base = dict(op=case.bench.name, provider=case.provider, shape=case.shape,
                shape_str=shape_str(case.shape), dtype=dtype_str(case.dtype), mode=case.mode)
    if case.skip is not None:
        rec.row(**base, metric="skipped", value=None, unit="", reason=case.skip)
        pytest.skip(case.skip)

    dev = cfg.torch_device
    torch.manual_seed(0)
    inputs = case.bench.make_inputs(case.shape, case.dtype, dev)
    fn = provider_fn(case.bench, case.provider)
    grad_tensors = [inputs.args[n] for n in inputs.grad_names]

    # Correctness first (one forward, also the first warm-up / compilation).
    with torch.no_grad():
        want = case.bench.call_backend(inputs, "reference")
    if grad_tensors:
        got = fn(inputs)
    else:
        with torch.no_grad():
            got = fn(inputs)
    _check_close(case, got, want, inputs.mask)
    del want

    primary = case.bench.outputs(got)[0]
    if case.mode == "forward":
        if grad_tensors:
            def run():
                return fn(inputs)
        else:
            def run():
                with torch.no_grad():
                    return fn(inputs)
    elif case.mode == "backward":
        gout = _grad_out(primary)
        run_out = primary

        def run():
            return torch.autograd.grad(run_out, grad_tensors, gout, retain_graph=True)
    else:
        gout = _grad_out(primary)

        def run():
            out = case.bench.outputs(fn(inputs))[0]
            return torch.autograd.grad(out, grad_tensors, gout)
    if case.mode != "backward":
        del got, primary

    t0 = time.perf_counter()
    run()  # warm-up (compiles the backward graph for torch_compile)
    sync(cfg.device)
    once = time.perf_counter() - t0
    rows = []
    if cfg.device == "cuda":
        # Not in "backward" mode: its graph was recorded on the default stream before the capture,
        # so autograd would replay it there, outside the capturing stream.
        t = time_gpu(run, cfg, graph=case.bench.small and case.mode != "backward")
        mem = gpu_peak_extra_mb(run)
        if benchmark is not None and not getattr(benchmark, "disabled", False):
            def run_sync():
                run()
                torch.cuda.synchronize()
            benchmark.pedantic(run_sync, rounds=3, iterations=1, warmup_rounds=1)
        timer = "cuda_events_do_bench_median"
    else:
        t = time_cpu(run, cfg, benchmark, once)
        mem = cpu_peak_extra_mb(run)
        timer = "wall_median"
    ms = t["time_ms"]
    rows.append(rec.row(**base, metric="time_ms", value=ms, unit="ms", timer=timer))
    if t.get("graph_time_ms") is not None:
        rows.append(rec.row(**base, metric="graph_time_ms", value=t["graph_time_ms"], unit="ms",
                            timer="cuda_graph_replay_median"))
    elif t.get("graph_error"):
        rows.append(rec.row(**base, metric="graph_time_ms", value=None, unit="ms", reason=t["graph_error"]))
    if mem is not None:
        rows.append(rec.row(**base, metric="peak_extra_mb", value=mem, unit="MB"))
    floor = case.bench.floor_bytes(case.shape, case.dtype, case.mode)
    if floor and ms > 0:
        gbps = floor / (ms * 1e-3) / 1e9
        rows.append(rec.row(**base, metric="bandwidth_gbps", value=gbps, unit="GB/s", floor_bytes=floor))
        copy = cfg.ceilings.get("copy_bandwidth_gbps")
        if copy:
            rows.append(rec.row(**base, metric="bandwidth_pct", value=100.0 * gbps / copy, unit="%"))
    if benchmark is not None:
        benchmark.extra_info.update({"time_ms": ms, "peak_extra_mb": mem})
    return rows


def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def script_main(path: str, argv=None) -> int:
    """``python benchmarks/bench_X.py [--device D] [--quick] [--threads N] [--results-dir P] [pytest args]``."""
    import argparse

    import pytest

    p = argparse.ArgumentParser(description=f"run {Path(path).name} through pytest-benchmark")
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--no-record", action="store_true")
    args, rest = p.parse_known_args(argv)
    pargs = [path, "-q", "-p", "no:cacheprovider", "-o", "python_files=bench_*.py"] + pytest_benchmark_args()
    if args.device:
        pargs += ["--bench-device", args.device]
    if args.quick:
        pargs.append("--bench-quick")
    if args.threads:
        pargs += ["--bench-threads", str(args.threads)]
    if args.results_dir:
        pargs += ["--bench-results-dir", args.results_dir]
    if args.no_record:
        pargs.append("--bench-no-record")
    return pytest.main(pargs + rest)


def pytest_benchmark_args() -> list[str]:
    return ["--benchmark-columns=median,rounds"] if HAVE_PYTEST_BENCHMARK else []
