"""pytest configuration of the benchmark scripts: options, one test per case, session fixtures.

Run one family:  ``python -m pytest benchmarks/bench_gae.py --bench-device cpu --bench-quick``
(or ``python benchmarks/bench_gae.py --quick``); every family at once, with the report:
``python benchmarks/run_all.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import common


def pytest_addoption(parser):
    g = parser.getgroup("rlhf-bench")
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    g.addoption("--bench-quick", action="store_true", help="tiny shapes and few rounds (smoke test)")
    g.addoption("--bench-threads", type=int, default=None, help="torch.set_num_threads on CPU")
    g.addoption("--bench-results-dir", default=str(common.DEFAULT_RESULTS_DIR))
    g.addoption("--bench-run-id", default=None, help="groups the rows of one run (run_all sets it)")
    g.addoption("--bench-no-record", action="store_true", help="do not append result rows")
    g.addoption("--bench-skip-providers", default="", help="comma-separated providers to leave out")
    g.addoption("--bench-providers", default="", help="comma-separated providers to run (default: all)")
    g.addoption("--bench-copy-gbps", type=float, default=None,
                help="copy bandwidth measured earlier in this run (run_all passes it); else measured here")


def _split(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _config(config) -> common.Config:
    cfg = getattr(config, "_rlhf_bench_cfg", None)
    if cfg is None:
        o = config.getoption
        cfg = common.Config(
            device=o("--bench-device") or common.default_device(),
            quick=o("--bench-quick"),
            threads=o("--bench-threads"),
            results_dir=Path(o("--bench-results-dir")),
            run_id=o("--bench-run-id") or common.new_run_id(),
            record=not o("--bench-no-record"),
            skip_providers=_split(o("--bench-skip-providers")),
            only_providers=_split(o("--bench-providers")),
        )
        common.apply_threads(cfg)
        config._rlhf_bench_cfg = cfg
    return cfg


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cfg = _config(metafunc.config)
        cs = common.cases(metafunc.module.BENCHES, cfg)
        metafunc.parametrize("bench_case", cs, ids=[c.id for c in cs])


@pytest.fixture(scope="session")
def bench_cfg(pytestconfig):
    return _config(pytestconfig)


@pytest.fixture(scope="session")
def bench_recorder(bench_cfg, pytestconfig):
    rec = common.Recorder(bench_cfg)
    copy = pytestconfig.getoption("--bench-copy-gbps")
    if copy:
        bench_cfg.ceilings["copy_bandwidth_gbps"] = copy
    else:  # run standalone: measure (and record) the ceilings of this run here
        bench_cfg.ceilings.update(common.record_ceilings(bench_cfg, rec))
    return rec


@pytest.fixture
def run_bench(bench_cfg, bench_recorder, request):
    # A GPU machine may have pytest without pytest-benchmark: time with the same loop, no table.
    plugin = request.config.pluginmanager.hasplugin("benchmark")
    benchmark = request.getfixturevalue("benchmark") if plugin else None

    def run(case):
        return common.run_case(case, bench_cfg, bench_recorder, benchmark)

    return run


def pytest_report_header(config):
    cfg = _config(config)
    return f"rlhf-bench: device={cfg.device} quick={cfg.quick} threads={os.environ.get('OMP_NUM_THREADS')}/{cfg.threads} run_id={cfg.run_id}"
