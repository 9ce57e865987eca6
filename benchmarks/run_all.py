"""Run every benchmark script in one run and print the report.

    python benchmarks/run_all.py [--device cpu|cuda] [--quick] [--threads N] [--no-plots]
                                 [--results-dir DIR] [--update-readme] [--only gae,dpo]

One run = one run id: the device ceilings are measured first, then each ``bench_*.py`` runs in its
own pytest process (so one script's memory cannot inflate the next one's peak RSS), all appending
rows tagged with that id; the report's ratios compare providers inside this run only.  Every
rlhf_kernels backend available here is benchmarked (Triton is left out on CPU tensors: there it
only runs in the interpreter).  On CPU the default shapes are smaller than the GPU ones (see each
script's ``_shapes``); ``--quick`` uses tiny shapes and two rounds, to check the scripts work.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common
import report

# token_logprobs last: it is the longest, and a --budget that runs out should cost it alone.
SCRIPTS = ("bench_gae.py", "bench_losses.py", "bench_dpo.py", "bench_logprobs.py")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, two rounds (CI smoke run)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads, OMP_NUM_THREADS)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--results-dir", default=str(common.DEFAULT_RESULTS_DIR))
    p.add_argument("--update-readme", action="store_true", help="regenerate README.md's benchmark section")
    p.add_argument("--only", default="", help="comma-separated script names (logprobs,gae,losses,dpo)")
    p.add_argument("--skip-providers", default="", help="comma-separated providers to leave out")
    p.add_argument("--timeout", type=int, default=None, help="seconds allowed per script")
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for all scripts together: each gets what is left (rows already written are kept)")
    args = p.parse_args(argv)

    cfg = common.Config(
        device=args.device or common.default_device(),
        quick=args.quick,
        threads=args.threads,
        results_dir=Path(args.results_dir),
        run_id=common.new_run_id(),
    )
    env = dict(os.environ)
    # Triton's interpreter must not be on for timing (tests/conftest.py turns it on for CPU tests).
    env.pop("TRITON_INTERPRET", None)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
        env["MKL_NUM_THREADS"] = str(cfg.threads)
    common.apply_threads(cfg)
    rec = common.Recorder(cfg)
    print(f"run {cfg.run_id} on {rec.env['device_name']}; rows go to {rec.path}", flush=True)
    ceilings = common.record_ceilings(cfg, rec)
    print("ceilings: " + ", ".join(f"{k}={v:.4g}" for k, v in ceilings.items()), flush=True)

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    failed = []
    start = time.time()
    for script in SCRIPTS:
        if only and script[len("bench_"):-3] not in only:
            continue
        cmd = [
            sys.executable, "-m", "pytest", str(HERE / script), "-q", "-p", "no:cacheprovider",
            "-o", "python_files=bench_*.py", *common.pytest_benchmark_args(),
            "--bench-device", cfg.device, "--bench-results-dir", str(cfg.results_dir),
            "--bench-run-id", cfg.run_id, "--bench-copy-gbps", repr(ceilings["copy_bandwidth_gbps"]),
        ]
        if cfg.quick:
            cmd.append("--bench-quick")
        if cfg.threads:
            cmd += ["--bench-threads", str(cfg.threads)]
        if args.skip_providers:
            cmd += ["--bench-skip-providers", args.skip_providers]
        t0 = time.time()
        timeout = args.timeout
        if args.budget is not None:
            left = int(args.budget - (t0 - start))
            if left < 10:
                print(f"{script}: not run, the --budget of {args.budget}s is spent", flush=True)
                failed.append(script)
                continue
            timeout = min(timeout, left) if timeout else left
        try:
            rc = subprocess.run(cmd, env=env, cwd=str(common.ROOT), timeout=timeout,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out, code = rc.stdout, rc.returncode
        except subprocess.TimeoutExpired as exc:
            out, code = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
        tail = [ln for ln in out.splitlines() if ln.strip()][-1:] if out else []
        print(f"{script}: exit {code} in {time.time() - t0:.0f}s  {tail[0] if tail else ''}", flush=True)
        if code not in (0,):
            failed.append(script)
            print(out[-6000:], flush=True)

    # linear_token_logprobs: its own driver (a fresh process per provider), rows under the same run id
    if not only or "linear_logprobs" in only:
        cmd = [sys.executable, str(HERE / "bench_linear_logprobs.py"), "--device", cfg.device,
               "--results-dir", str(cfg.results_dir), "--run-id", cfg.run_id]
        cmd += (["--quick"] if cfg.quick else []) + (["--threads", str(cfg.threads)] if cfg.threads else [])
        t0 = time.time()
        rc = subprocess.run(cmd, env=env, cwd=str(common.ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, check=False)
        print(f"bench_linear_logprobs.py: exit {rc.returncode} in {time.time() - t0:.0f}s", flush=True)
        print(rc.stdout[-3000:], flush=True)
        if rc.returncode != 0:
            failed.append("bench_linear_logprobs.py")

    path, text = report.write_report(cfg.results_dir, [cfg.run_id], plots=not args.no_plots)
    print(text)
    print(f"\nwrote {path}")
    if args.update_readme:
        rows = report.load_rows(cfg.results_dir)
        try:
            rel = str((cfg.results_dir / "REPORT.md").resolve().relative_to(common.ROOT))
        except ValueError:
            rel = str(cfg.results_dir / "REPORT.md")
        changed = report.update_readme(report.readme_section(rows, rel))
        print(f"README.md benchmark section {'updated' if changed else 'unchanged'}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
