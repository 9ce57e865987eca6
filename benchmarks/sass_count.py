"""Count SASS instructions per element in the main loops of the token_logprobs kernels, without a GPU.

The Triton forward and backward kernels are lowered ahead of time for sm_90 (H100/H200) at their
GPU launch settings, and ``csrc/cuda/logprobs.cu`` is compiled with nvcc for sm_90; ``cuobjdump
-sass`` (or ``nvdisasm``) disassembles each cubin.  Usage::

    python benchmarks/sass_count.py [--json OUT.json] [--show]

How the count is made (the same rule for every kernel):

* a *loop* is a backward branch: a ``BRA`` whose target address is at or before the branch itself;
  its *body* is every instruction from the target to the branch, inclusive (a static count: a
  rarely taken path that the compiler placed inside that range counts once, like any other);
* the *elements per iteration* of a loop are the bytes its global loads of the logits bring in
  (``LDG``/``LDGSTS`` of 16, 8, 4 or 2 bytes each, ``.128`` = 16 bytes) divided by the element size;
* the *main loop* of a kernel is the loop with the widest logits loads (the vectorized bulk loop, not a
  scalar fallback), then the most elements per iteration, then the first in program order (in these
  kernels the bulk loop precedes the head/tail loop), and the figure reported is ``body instructions / elements per iteration`` for one
  thread, i.e. the instructions one thread issues per logit it reads.  Loops with no logits load
  (the ignored-row zero fill of a backward) are not candidates.

The tools come with the CUDA toolkit, or from the ``nvidia-cuda-cuobjdump`` /
``nvidia-cuda-nvdisasm`` wheels (``nvidia/cu13/bin``), which this script also looks in.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_FUNC = re.compile(r"Function\s*:\s*(\S+)")


def find_tool(name: str) -> str | None:
    """``name`` on PATH, in the CUDA toolkit, or in an nvidia-* wheel's bin folder."""
    hit = shutil.which(name)
    if hit:
        return hit
    cands = [f"/usr/local/cuda/bin/{name}"]
    for p in sys.path:
        cands += glob.glob(os.path.join(p, "nvidia", "cu*", "bin", name))
        cands += glob.glob(os.path.join(p, "nvidia", "cuda_*", "bin", name))
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def disassemble(cubin_path: str) -> dict[str, list[tuple[int, str, str]]]:
    """cubin -> {function name: [(address, opcode, operands), ...]}."""
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found: install the CUDA toolkit or `pip install --no-deps "
                           "nvidia-cuda-cuobjdump`")
    text = subprocess.run([tool, "-sass", cubin_path], check=True, capture_output=True, text=True).stdout
    funcs: dict[str, list] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INSN.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return funcs


def _load_bytes(op: str) -> int:
    """Bytes a global load instruction reads per thread (0 for anything else)."""
    if not (op.startswith("LDG") or op.startswith("LDGSTS")):
        return 0
    for suffix, n in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return n
    return 4


def loops(insns, elem_bytes: int, exclude_loads=()):
    """Every backward-branch loop: dict(start, end, body, elements, per_element, loads)."""
    out = []
    for i, (addr, op, args) in enumerate(insns):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", args)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target > addr:
            continue
        body = [(a, o, r) for (a, o, r) in insns if target <= a <= addr]
        loads = [o for (_, o, r) in body if _load_bytes(o) and not any(x in r for x in exclude_loads)]
        nbytes = sum(_load_bytes(o) for o in loads)
        elems = nbytes / elem_bytes
        out.append({"start": hex(target), "end": hex(addr), "body": len(body), "loads": loads,
                    "elements": elems, "per_element": (len(body) / elems) if elems else None})
    return out


def main_loop(insns, elem_bytes: int):
    cands = [lp for lp in loops(insns, elem_bytes) if lp["elements"]]
    if not cands:
        return None
    def width(lp):
        return max(_load_bytes(o) for o in lp["loads"])

    widest = max(width(lp) for lp in cands)
    cands = [lp for lp in cands if width(lp) == widest]
    most = max(lp["elements"] for lp in cands)
    return next(lp for lp in cands if lp["elements"] == most)  # ties: the first in program order


def count_cubin(cubin: bytes | str, elem_bytes: int, func_filter=None) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = cubin if isinstance(cubin, str) else os.path.join(tmp, "k.cubin")
        if not isinstance(cubin, str):
            with open(path, "wb") as f:
                f.write(cubin)
        funcs = disassemble(path)
    res = {}
    for name, insns in funcs.items():
        if func_filter and not func_filter(name):
            continue
        ml = main_loop(insns, elem_bytes)
        res[name] = {"total_instructions": len(insns), "main_loop": ml}
    return res


# ---------------------------------------------------------------------------------------------
# Triton


# Scalar arguments of the kernels (old and new names), and the constexprs to pin at GPU settings.
_SCALARS = {"T": "i32", "V": "i32", "V_MAIN": "i32", "stride_a": "i64", "stride_t": "i32", "stride_v": "i32",
            "temperature": "fp32", "inv_t": "fp32", "scale": "fp32", "ignore_index": "i64"}


def triton_case(kernel, dtype: str, constexprs: dict, num_warps: int, aligned_shape: bool = True):
    """AOT signature of a token_logprobs kernel for contiguous ``dtype`` rows: pointers typed by name,
    stride_v pinned to 1 (what a JIT launch specialises for a unit stride), the vocabulary and
    strides marked divisible by 16 (what the JIT sees for V = 32000, 128256, 151936)."""
    sig, consts, aligned = {}, {}, []
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            sig[name] = (f"*{dtype}" if name in ("logits_ptr", "grad_logits_ptr")
                         else "*i64" if name == "labels_ptr" else "*fp32")
            if name in ("logits_ptr", "grad_logits_ptr"):
                aligned.append(name)
        elif name == "stride_v":
            sig[name], consts[name] = "constexpr", 1
        elif name in constexprs:
            sig[name], consts[name] = "constexpr", constexprs[name]
        else:
            sig[name] = _SCALARS[name]
            if aligned_shape and name in ("V", "V_MAIN", "stride_a", "stride_t"):
                aligned.append(name)
    return {"kernel": kernel, "signature": sig, "constexprs": consts, "aligned": aligned, "num_warps": num_warps,
            "elem_bytes": 2 if dtype in ("bf16", "fp16") else 4}


def _triton_cases():
    """The forward (entropy on and off) and backward kernels for bf16 and fp32 rows at the launch
    settings a V = 128256 row gets on an H100 (the first autotune config when there is a list)."""
    import importlib

    lp = importlib.import_module("rlhf_kernels.triton.logprobs")
    cases = []
    for dtype in ("bf16", "fp32"):
        fwd = getattr(lp, "_token_logprobs_fwd_kernel")
        bwd = getattr(lp, "_token_logprobs_bwd_kernel")
        gpu_cfg = getattr(lp, "gpu_config", None)
        for kind, kernel, ent, al in (("fwd", fwd, True, True), ("fwd", fwd, False, True), ("bwd", bwd, True, True),
                                      ("fwd", fwd, True, False)):
            if gpu_cfg is not None:
                block_v, num_warps = gpu_cfg(kind, dtype)
            else:  # before the autotuned version: the fixed H100 config of the old launcher
                block_v = 8192 if dtype == "bf16" else 4096
                num_warps = 16 if block_v > 4096 else 8
            consts = {"RETURN_ENTROPY": ent, "HAS_GRAD_LP": True, "HAS_GRAD_ENT": ent, "BLOCK_V": block_v,
                      "SOFT_BF16": False, "VOCAB_CONTIG": True,
                      "ALIGN": 8 if dtype == "bf16" else 4, "OUT_ALIGNED": True, "FAST_EXP2": True}
            real = kernel
            while not hasattr(real, "arg_names"):  # an Autotuner / Heuristics wraps the JITFunction
                real = real.fn
            case = triton_case(real, dtype, consts, num_warps, aligned_shape=al)
            case["label"] = (f"{kind} {dtype}" + (" ent" if ent else " noent") + ("" if al else " V%16!=0")
                             + f" BLOCK_V={block_v} w={num_warps}")
            cases.append(case)
    return cases


def triton_counts():
    os.environ["TRITON_INTERPRET"] = "0"
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    target = GPUTarget("cuda", 90, 32)
    out = {}
    for case in _triton_cases():
        fn = case["kernel"]
        names = fn.arg_names
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case["aligned"]}
        k = compile(ASTSource(fn, case["signature"], constexprs=case["constexprs"], attrs=attrs), target=target,
                    options={"num_warps": case["num_warps"]})
        res = count_cubin(k.asm["cubin"], case["elem_bytes"])
        (name, r), = res.items()
        r["config"] = {k2: v for k2, v in case["constexprs"].items() if k2.isupper()}
        r["num_warps"] = case["num_warps"]
        out[f"triton {case['label']}"] = r
    return out


# ---------------------------------------------------------------------------------------------
# CUDA C++


def cuda_counts():
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "logprobs.cubin")
        subprocess.run([nvcc, "-cubin", "-std=c++20", "-O3", f"-I{ROOT / 'csrc' / 'include'}", "-arch=sm_90",
                        str(ROOT / "csrc" / "cuda" / "logprobs.cu"), "-o", cubin], check=True)
        funcs = disassemble(cubin)
        for name, insns in funcs.items():
            kind = "fwd" if "fwd" in name else ("bwd" if "bwd" in name else None)
            if kind is None:
                continue
            if "13__nv_bfloat16" in name:
                dtype, eb = "bf16", 2
            elif "6__half" in name:
                dtype, eb = "fp16", 2
            else:
                dtype, eb = "fp32", 4
            ent = " ent" if "Lb1E" in name else (" noent" if "Lb0E" in name else "")  # the bool template argument
            ml = main_loop(insns, eb)
            out[f"cuda {kind} {dtype}{ent}"] = {"function": name, "total_instructions": len(insns), "main_loop": ml}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the counts here")
    ap.add_argument("--show", action="store_true", help="print every loop, not only the main one")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    results = {}
    results.update(triton_counts())
    results.update(cuda_counts())
    print(f"{'kernel':34s} {'loop body':>9s} {'elems/iter':>10s} {'insn/elem':>9s}  loads")
    for name, r in results.items():
        ml = r["main_loop"]
        if ml is None:
            print(f"{name:34s} (no loop over the logits)")
            continue
        loads = ",".join(sorted(set(ml["loads"])))
        print(f"{name:34s} {ml['body']:9d} {ml['elements']:10.0f} {ml['per_element']:9.2f}  {loads}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


if __name__ == "__main__":
    main()
