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


def test_script_is_valid_bash():
    assert SCRIPT.exists()
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed here")
def test_script_passes_shellcheck():
    proc = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_test_file_and_deselected_test_exists():
    files = _array("GPU_TEST_FILES")
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
    files = _array("GPU_TEST_FILES")
    sources = "\n".join((ROOT / f).read_text() for f in files)
    import rlhf_kernels as rk

    for op in rk.OPS:
        assert f"rk.{op}(" in sources, f"no test in the GPU subset calls {op}"
    for needed in ("def test_vocab_262144", "def test_offsets_beyond_2_pow_31", "bfloat16", "float16"):
        assert needed in sources, f"the GPU subset lacks {needed}"


def test_the_subset_collects_with_the_scripts_arguments():
    """The same file list and -k expression select tests (here on CPU; 0 selected would be a bug)."""
    files = _array("GPU_TEST_FILES")
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
