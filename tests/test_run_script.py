"""run.py, the README's two commands: what it installs and when, checked without installing
anything (pip and the environment probe are replaced by recorders)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run.py loaded as a module, pointed at a copy of the build inputs in tmp_path."""
    spec = importlib.util.spec_from_file_location("rlhf_run_script", ROOT / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path / "repo"
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "setup.py").write_text("# setup\n")
    (root / "csrc" / "cpu" / "a.cpp").write_text("int a;\n")
    (root / "rlhf_kernels").mkdir()
    monkeypatch.setattr(mod, "ROOT", root)
    monkeypatch.setattr(mod, "STAMPS", root / ".venv-stamps")

    state = {"torch": None, "installed": False, "pip": []}

    def probe(py):
        return {"torch": state["torch"], "setuptools": "75.0", "wheel": "0.44",
                "package": "0.1.0" if state["installed"] else None,
                "package_origin": str(root / "rlhf_kernels" / "__init__.py") if state["installed"] else None,
                "pytest": state["installed"], "executable": str(py)}

    def pip(py, *args):
        state["pip"].append(args)
        if any(a.startswith("torch==") for a in args):
            state["torch"] = "2.13.0"
        if "-e" in args:
            state["installed"] = True

    monkeypatch.setattr(mod, "probe", probe)
    monkeypatch.setattr(mod, "pip", pip)
    mod._state = state
    return mod


def test_first_run_installs_torch_then_the_package_pinning_torch(run):
    py = Path(sys.executable)
    run.ensure_installed(py, reinstall=False)
    calls = run._state["pip"]
    assert calls[0][-1] == "torch==2.13.0" or "torch==2.13.0" in calls[0], calls
    editable = [c for c in calls if "-e" in c]
    assert len(editable) == 1 and ".[dev]" in editable[0] and "--no-build-isolation" in editable[0], calls
    constraint = Path(editable[0][editable[0].index("-c") + 1])
    assert constraint.read_text().strip() == "torch==2.13.0", "pip must not be free to replace torch"
    stamp = json.loads(run.stamp_path(py).read_text())
    assert stamp["digest"] == run.sources_digest()


def test_second_run_skips_pip(run):
    py = Path(sys.executable)
    run.ensure_installed(py, reinstall=False)
    run._state["pip"].clear()
    run.ensure_installed(py, reinstall=False)
    assert run._state["pip"] == []


def test_existing_torch_is_never_installed_or_replaced(run):
    run._state["torch"] = "2.9.1+cu128"  # a user's CUDA build
    run.ensure_installed(Path(sys.executable), reinstall=False)
    calls = run._state["pip"]
    assert not any(a.startswith("torch") for c in calls for a in c if not a.endswith(".txt")), calls
    constraint = run.STAMPS / "torch-constraint.txt"
    assert constraint.read_text().strip() == "torch==2.9.1+cu128"


@pytest.mark.parametrize("path", ["csrc/cpu/a.cpp", "setup.py", "pyproject.toml", "csrc/cpu/new.cpp"])
def test_a_changed_build_input_reinstalls(run, path):
    py = Path(sys.executable)
    run.ensure_installed(py, reinstall=False)
    run._state["pip"].clear()
    (run.ROOT / path).write_text("changed\n")
    run.ensure_installed(py, reinstall=False)
    assert [c for c in run._state["pip"] if "-e" in c], f"{path} changed but nothing was reinstalled"


def test_package_installed_from_elsewhere_is_reinstalled_from_here(run, tmp_path):
    py = Path(sys.executable)
    run.ensure_installed(py, reinstall=False)
    run._state["pip"].clear()
    real_probe = run.probe

    def elsewhere(p):
        info = real_probe(p)
        info["package_origin"] = str(tmp_path / "other" / "rlhf_kernels" / "__init__.py")
        return info

    run.probe = elsewhere
    run.ensure_installed(py, reinstall=False)
    assert [c for c in run._state["pip"] if "-e" in c]


def test_arguments_after_the_command_go_to_the_job():
    spec = importlib.util.spec_from_file_location("rlhf_run_script2", ROOT / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    opts, cmd, rest = mod.parse(["--python", "/x/python", "test", "-k", "gae", "--python", "y"])
    assert (opts["python"], cmd, rest) == ("/x/python", "test", ["-k", "gae", "--python", "y"])
    opts, cmd, rest = mod.parse(["--system-site-packages", "pipeline", "--seed", "1"])
    assert opts["system_site"] and cmd == "pipeline" and rest == ["--seed", "1"]


def test_bad_usage_is_one_line_and_exit_2():
    for argv in ([], ["--bogus", "test"], ["frobnicate"]):
        proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *argv], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.startswith("run.py: error: "), proc.stderr
