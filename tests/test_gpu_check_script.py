"""benchmarks/gpu_check.sh is run on a GPU machine that is lent for minutes: everything it names
must exist, and it must be valid bash, checked here on CPU before the GPU is at hand."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "deps", "build", "cuda_ext", "backends", "tests", "bench_logprobs", "bench_ops",
          "bench_compile"]


def _text() -> str:
    return SCRIPT.read_text()


def _array(name: str) -> list[str]:
    m = re.search(rf"^{name}=\((.*?)\)", _text(), re.S | re.M)
    assert m, f"{name}=( ... ) not found in {SCRIPT}"
    body = "\n".join(line.split("#", 1)[0] for line in m.group(1).splitlines())
    return shlex.split(body)


def _scalar(name: str) -> str:
    m = re.search(rf'^{name}=("?)(.*?)\1$', _text(), re.M)
    assert m, f"{name}= not found in {SCRIPT}"
    return m.group(2)


def _gpu_test_files() -> list[str]:
    """The subset as the script derives it: every tests/test_*.py not in GPU_TEST_EXCLUDE."""
    excluded = set(_array("GPU_TEST_EXCLUDE"))
    return sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if f"tests/{p.name}" not in excluded)


def test_the_script_derives_the_same_subset():
    """The bash loop of the script and _gpu_test_files() agree (the script is the one that runs)."""
    m = re.search(r"^GPU_TEST_EXCLUDE=\(.*?^done$", _text(), re.S | re.M)
    assert m, "the GPU_TEST_EXCLUDE block and its loop were not found"
    proc = subprocess.run(["bash", "-c", m.group(0) + '\nprintf "%s\\n" "${GPU_TEST_FILES[@]}"'],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == _gpu_test_files()
    for f in _array("GPU_TEST_EXCLUDE"):
        assert (ROOT / f).is_file(), f"GPU_TEST_EXCLUDE names {f}, which does not exist"


def test_script_is_valid_bash():
    assert SCRIPT.exists()
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed here")
def test_script_passes_shellcheck():
    proc = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_test_file_and_deselected_test_exists():
    files = _gpu_test_files()
    assert files, "no test files named"
    for f in files:
        assert (ROOT / f).is_file(), f"gpu_check.sh names {f}, which does not exist"
    sources = "\n".join((ROOT / f).read_text() for f in files)
    expr = _scalar("GPU_TEST_DESELECT")
    names = re.findall(r"not (\w+)", expr)
    assert names and expr == " and ".join(f"not {n}" for n in names), expr
    for n in names:
        assert re.search(rf"^def {n}\(", sources, re.M), f"-k deselects {n}, no such test in {files}"


def test_the_subset_covers_every_op_and_the_big_shapes():
    """Every op's values and gradients, large vocabularies and offsets past 2^31."""
    files = _gpu_test_files()
    sources = "\n".join((ROOT / f).read_text() for f in files)
    import rlhf_kernels as rk

    for op in rk.OPS:
        assert f"rk.{op}(" in sources, f"no test in the GPU subset calls {op}"
    for needed in ("def test_vocab_262144", "def test_offsets_beyond_2_pow_31", "bfloat16", "float16"):
        assert needed in sources, f"the GPU subset lacks {needed}"


def test_the_subset_collects_with_the_scripts_arguments():
    """The same file list and -k expression select tests (here on CPU; 0 selected would be a bug)."""
    files = _gpu_test_files()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "-m", "not slow",
         "-k", _scalar("GPU_TEST_DESELECT"), *files],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, RLHF_TEST_DEVICE="cpu"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", proc.stdout)
    assert m and int(m.group(1)) > 500, proc.stdout[-1000:]


def test_every_benchmark_named_exists():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    names = _scalar("BENCH_FIRST").split(",") + _scalar("BENCH_REST").split(",")
    assert names[0] == "logprobs", "token_logprobs is benchmarked first"
    for n in names:
        assert (ROOT / "benchmarks" / f"bench_{n}.py").is_file(), n
        assert f"bench_{n}.py" in run_all.SCRIPTS, n
    assert sorted(names) == sorted(s[len("bench_"):-3] for s in run_all.SCRIPTS), "a benchmark is left out"
    options = set(re.findall(r'add_argument\("(--[a-z-]+)"', (ROOT / "benchmarks" / "run_all.py").read_text()))
    for opt in set(re.findall(r"run_all\.py[^\n]*", _text())):
        for flag in re.findall(r"--[a-z-]+", opt):
            assert flag in options, f"run_all.py has no option {flag}"
    import common

    known = set(common.PEER_PROVIDERS) | {"reference", "triton", "cuda", "cpu"}
    for lst in re.findall(r"--skip-providers ([\w,]+)", _text()):
        for p in lst.split(","):
            assert p in known, f"unknown provider {p}"


def test_summary_lists_every_stage():
    text = _text()
    for s in STAGES:
        assert re.search(rf"\b{s}\b", text), s


def test_readme_points_to_the_script():
    readme = (ROOT / "README.md").read_text()
    assert "benchmarks/gpu_check.sh" in readme
    assert "run_gpu.sh" not in readme


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_it_fails_cleanly_with_a_summary(tmp_path):
    """No CUDA device: the env stage fails, every other stage is skipped, the summary is printed
    and written, the exit status is 1, and nothing is installed or built."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_BUDGET_S="120", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    t = time.time()
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=200)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert time.time() - t < 120
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert summary in proc.stdout
    rows = {line.split()[0]: line.split()[1] for line in summary.splitlines()
            if line and line.split()[0] in STAGES}
    assert rows == {"env": "FAIL", **{s: "SKIP" for s in STAGES[1:]}}, summary
    assert "no CUDA device" in (tmp_path / "out" / "logs" / "env.log").read_text()
    assert "overall: FAIL" in summary


_FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for a GPU machine's python: records each call (and the environment that matters),
# answers torch's version, and fails the stage named in FAKE_FAIL.
input=""
[ "${1:-}" = "-" ] && input=$(cat)
echo "CALL $* | DEVICE=${RLHF_TEST_DEVICE:-} REQUIRE=${RLHF_TEST_REQUIRE_BACKENDS:-} JIT=${RLHF_KERNELS_JIT:-} \\
BUILD_CUDA=${RLHF_KERNELS_BUILD_CUDA:-} ARCH=${RLHF_KERNELS_CUDA_ARCH:-} INTERPRET=${TRITON_INTERPRET:-}" >> "$FAKE_LOG"
case "$input" in *build_info*) [ "${FAKE_FAIL:-}" = cuda_ext ] && { echo "loaded WITHOUT its CUDA kernels"; exit 1; } ;; esac
case "$*" in *"-m pytest"*) [ "${FAKE_FAIL:-}" = tests ] && { echo "3 failed, 900 passed"; exit 1; } ;; esac
if [ "${1:-}" = "-c" ]; then case "$2" in *__version__*) echo "2.9.0+cu128" ;; esac; fi
exit 0
"""


def _fake_run(tmp_path, fail=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = bin_dir / "python"
    py.write_text(_FAKE_PYTHON)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.8'\n")
    py.chmod(0o755)
    nvcc.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(py), FAKE_LOG=str(log), FAKE_FAIL=fail,
               PATH=f"{bin_dir}:{os.environ['PATH']}", GPU_CHECK_BUDGET_S="470", TRITON_INTERPRET="1")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    rows = {line.split()[0]: line.split()[1] for line in summary.splitlines()
            if line and line.split()[0] in STAGES}
    return proc, rows, log.read_text().splitlines()


def test_stages_run_in_order_with_the_right_settings(tmp_path):
    """Orchestration with a stand-in python and nvcc: every stage passes and runs in order, the
    tests run on CUDA tensors requiring triton and cuda with the script's files and -k, the build
    forces the CUDA kernels for sm_90, no stage builds just in time, and the interpreter is off."""
    proc, rows, calls = _fake_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rows == {s: "PASS" for s in STAGES}, rows
    assert all("INTERPRET= " in c or c.endswith("INTERPRET=") for c in calls), "TRITON_INTERPRET leaked"
    assert all("JIT=0" in c for c in calls)
    pip = [c for c in calls if "-m pip install" in c]
    assert pip and all("--no-deps" in c or "-c " in c for c in pip), f"pip free to touch torch: {pip}"
    assert not any(re.search(r"install[^|]* torch\b", c) for c in pip), pip
    build = [c for c in calls if "setup.py" in c]
    assert len(build) == 1 and "BUILD_CUDA=1" in build[0] and "ARCH=90" in build[0], build
    tests = [c for c in calls if "-m pytest -q" in c]
    assert len(tests) == 1, calls
    assert "DEVICE=cuda" in tests[0] and "REQUIRE=triton,cuda" in tests[0], tests[0]
    for f in _gpu_test_files():
        assert f in tests[0], f
    assert _scalar("GPU_TEST_DESELECT") in tests[0]
    bench = [c for c in calls if "run_all.py" in c]
    assert len(bench) == 3 and "--only logprobs" in bench[0], bench
    assert "--skip-providers torch_compile" in bench[0] and "--skip-providers torch_compile" in bench[1]
    assert "torch_compile" not in bench[2].split("--skip-providers")[1], "the last run is torch.compile's"
    order = [i for i, c in enumerate(calls) if "setup.py" in c or "-m pytest -q" in c or "run_all.py" in c]
    assert order == sorted(order)


def test_a_missing_cuda_build_fails_loudly_and_tests_still_run_triton(tmp_path):
    proc, rows, calls = _fake_run(tmp_path, fail="cuda_ext")
    assert proc.returncode == 1
    assert rows["cuda_ext"] == "FAIL" and rows["tests"] == "PASS", rows
    assert "WITHOUT its CUDA kernels" in proc.stdout
    tests = [c for c in calls if "-m pytest -q" in c]
    assert "REQUIRE=triton " in tests[0], tests[0]


def test_failing_tests_fail_the_check_but_the_benchmarks_still_run(tmp_path):
    proc, rows, calls = _fake_run(tmp_path, fail="tests")
    assert proc.returncode == 1
    assert rows["tests"] == "FAIL" and rows["bench_logprobs"] == "PASS", rows
    assert "overall: FAIL" in proc.stdout
