"""`pip install rlhf-kernels` gives the kernels without the pipeline's dependencies (transformers,
PyYAML: the `pipeline` extra), and the `rlhf` command says which extra to install when they are
missing."""

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent

# A meta-path finder that makes the pipeline's dependencies unimportable, as in a kernels-only install.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "yaml", "peft", "accelerate", "datasets"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + code], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=300)


def test_dependencies_are_split_into_kernels_and_a_pipeline_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for needed in ("torch", "triton", "numpy", "ninja"):
        assert needed in base
    for pipeline_only in ("transformers", "pyyaml"):
        assert pipeline_only not in base, f"{pipeline_only} is a base dependency; it belongs to [pipeline]"
        assert any(pipeline_only in d.lower() for d in project["optional-dependencies"]["pipeline"])
    # The tests (and README's set-up, which installs [dev]) get the pipeline too.
    assert any("[pipeline" in d for d in project["optional-dependencies"]["dev"])


def test_the_kernels_work_without_the_pipeline_dependencies():
    proc = _run("""
import torch, rlhf_kernels as rk
import rlhf_kernels.integrations, rlhf_kernels.integrations.hf
logits = torch.randn(4, 11, requires_grad=True)
labels = torch.tensor([1, 2, -100, 10])
lp = rk.token_logprobs(logits, labels)
lp.sum().backward()
hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
assert torch.allclose(rk.linear_token_logprobs(hidden, weight, labels), rk.token_logprobs(hidden @ weight.T, labels),
                      atol=1e-5)
assert "transformers" not in sys.modules and "yaml" not in sys.modules
print("ok")
""")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_rlhf_command_names_the_extra_when_the_pipeline_dependencies_are_missing():
    proc = _run("""
from rlhf.cli import main
sys.exit(main(["sft", "--max-steps", "1"]))
""")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "rlhf-kernels[pipeline]" in proc.stderr and "transformers" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
