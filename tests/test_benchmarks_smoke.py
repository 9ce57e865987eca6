"""The benchmark scripts run (quick mode, tiny shapes) and their report is produced, so they cannot
rot.  No timing is asserted: only that every case ran, was checked against the reference backend,
and left well-formed rows."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SCRIPTS = {
    "bench_logprobs.py": ("token_logprobs",),
    "bench_gae.py": ("gae",),
    "bench_losses.py": ("kl_penalty", "ppo_policy_loss", "ppo_value_loss"),
    "bench_dpo.py": ("dpo_loss",),
}


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the CPU tests; timings run without it
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _rows(results_dir: Path) -> list[dict]:
    rows = []
    for p in results_dir.glob("*.jsonl"):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_quick(script, tmp_path):
    # torch.compile is left out here (its first compile costs ~20 s per process); CI's
    # `benchmarks/run_all.py --quick` runs it.
    cmd = [sys.executable, str(BENCH / script), "--quick", "--device", "cpu", "--threads", "1",
           "--results-dir", str(tmp_path), "--bench-skip-providers", "torch_compile"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(tmp_path)
    assert rows, "no result rows written"
    env_keys = {"run_id", "date", "device", "device_name", "torch", "triton", "cuda", "op", "provider",
                "shape", "dtype", "mode", "metric", "value"}
    for r in rows:
        assert env_keys <= set(r), sorted(env_keys - set(r))
    ceilings = {r["metric"]: r["value"] for r in rows if r["op"] == "_device"}
    assert ceilings.get("copy_bandwidth_gbps", 0) > 0 and ceilings.get("matmul_bfloat16_tflops", 0) > 0
    for op in SCRIPTS[script]:
        times = [r for r in rows if r["op"] == op and r["metric"] == "time_ms"]
        measured = {(r["provider"], r["mode"]) for r in times}
        modes = {r["mode"] for r in times}
        # eager and the reference backend exist everywhere; every mode of the op was timed for both
        for mode in modes:
            assert {("eager", mode), ("reference", mode)} <= measured, (op, mode, measured)
        assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in times)
        assert any(r["metric"] == "bandwidth_pct" for r in rows if r["op"] == op)
        skips = {r["provider"]: r["reason"] for r in rows if r["op"] == op and r["metric"] == "skipped"}
        assert skips.get("torch_compile") and skips.get("liger")
        # Triton on CPU tensors would be interpreter timings: never benchmarked here
        assert ("triton" not in {p for p, _ in measured})
        if op == "token_logprobs":
            # the peers' own helpers are timed where their package imports, else skipped with a reason
            for peer, module in (("trl_selective_log_softmax", "trl.trainer.utils"),
                                 ("verl_logprobs_from_logits", "verl.utils.torch_functional"),
                                 ("openrlhf_log_probs_from_logits", "openrlhf.models.utils")):
                # importable in the benchmark's own process (this one may hold other tests' stubs)
                probe = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=_env(),
                                       capture_output=True, text=True, timeout=300, check=False)
                importable = probe.returncode == 0
                if importable:
                    assert (peer, "full") in measured, (peer, measured)
                else:
                    assert skips.get(peer), (peer, skips)


def test_report_tables_and_readme_section(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    env = {"device": "cpu", "device_name": "test cpu", "date": "2026-01-01T00:00:00+00:00", "quick": False,
           "torch": "x", "triton": "y", "cuda": None, "run_id": "r1"}
    rows = [dict(env, op="_device", provider="-", shape={}, shape_str="-", dtype="-", mode="-",
                 metric="copy_bandwidth_gbps", value=10.0)]
    for prov, ms in (("eager", 40.0), ("torch_compile", 20.0), ("cpu", 4.0), ("reference", 50.0)):
        rows.append(dict(env, op="gae", provider=prov, shape={"B": 256, "T": 1024}, shape_str="B=256xT=1024",
                         dtype="float32", mode="forward", metric="time_ms", value=ms))
    rows.append(dict(env, op="gae", provider="liger", shape={}, shape_str="B=256xT=1024", dtype="float32",
                     mode="forward", metric="skipped", value=None, reason="not installed"))
    (tmp_path / "cpu.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path, text = report.write_report(tmp_path, plots=False)
    line = next(ln for ln in text.splitlines() if "| **cpu** |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5:7] == ["10.00x", "5.00x"]  # 40/4 vs eager, 20/4 vs torch.compile
    assert "gae / liger: not installed" in text
    section = report.readme_section(report.load_rows(tmp_path), "REPORT.md")
    assert "GPU numbers are still owed" in section
    assert "| gae (cpu backend) >= 30x the Python loop at B=256, T=1024 | 10.00x (cpu) |" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    assert report.update_readme(section, readme)
    new = readme.read_text()
    assert "old" not in new and new.startswith("# x\n\nbefore\n") and new.endswith("after\n")


def test_wrong_provider_is_caught(tmp_path):
    """A provider whose output differs from the reference backend fails its case instead of
    producing a timing."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_dpo
        import common
    finally:
        sys.path.remove(str(BENCH))
    bench = dataclasses.replace(bench_dpo.BENCHES[0],
                                eager=lambda inp: tuple(x * 1.01 for x in bench_dpo.BENCHES[0].eager(inp)))
    cfg = common.Config(device="cpu", quick=True, results_dir=tmp_path, run_id="t", record=False)
    case = common.Case(bench, {"B": 16}, bench_dpo.torch.float32, "forward", "eager", None)
    with pytest.raises(AssertionError, match="differs from the reference backend"):
        common.run_case(case, cfg, common.Recorder(cfg))
    good = common.Case(bench_dpo.BENCHES[0], {"B": 16}, bench_dpo.torch.float32, "forward", "eager", None)
    rows = common.run_case(good, cfg, common.Recorder(cfg))
    assert {r["metric"] for r in rows} >= {"time_ms", "bandwidth_gbps"}


def test_backends_that_appear_later_are_benchmarked(tmp_path, monkeypatch):
    """The providers come from the dispatch registry at run time: a cpu backend that becomes
    available is benchmarked (here a stand-in running the reference ops), and Triton is still left out
    on CPU tensors even where the interpreter would let it run."""
    from rlhf_kernels import _dispatch

    sys.path.insert(0, str(BENCH))
    try:
        import bench_dpo
        import common
    finally:
        sys.path.remove(str(BENCH))
    registry = dict(_dispatch._REGISTRY)
    registry["cpu"] = dataclasses.replace(
        registry["cpu"], unavailable_reason=lambda: None, load_ops=_dispatch._reference_ops
    )
    registry["triton"] = dataclasses.replace(
        registry["triton"], unavailable_reason=lambda: None, load_ops=_dispatch._reference_ops
    )
    monkeypatch.setattr(_dispatch, "_REGISTRY", registry)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch._cached_ops.cache_clear()
    try:
        cfg = common.Config(device="cpu", quick=True, results_dir=tmp_path, run_id="t", record=False)
        avail = common.providers(bench_dpo.BENCHES[0], cfg, bench_dpo.torch.float32)
        assert avail["cpu"] is None and avail["reference"] is None and avail["eager"] is None
        assert "interpreter" in avail["triton"]
        cs = [c for c in common.cases(bench_dpo.BENCHES, cfg) if c.provider == "cpu" and c.mode == "full"]
        assert cs
        rows = common.run_case(cs[0], cfg, common.Recorder(cfg))
        assert any(r["provider"] == "cpu" and r["metric"] == "time_ms" for r in rows)
    finally:
        _dispatch._cached_ops.cache_clear()
