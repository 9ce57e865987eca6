"""The Triton backend as torch.library ops: torch.compile without graph breaks, opcheck, 64-bit
offsets, and ahead-of-time lowering of the kernels for an H100 (sm_90) without a GPU."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_kernels as rk

from .utils import DEVICE, assert_close, require

NS = "rlhf_kernels_triton"


def _ops():
    return getattr(torch.ops, NS)


def _training_step(backend):
    """One function calling every op, returning a scalar to differentiate and a detached stat."""

    def step(logits, labels, ref_lp, old_lp, mask, values, old_values, rewards, pc, pr, rc, rr):
        lp, ent = rk.token_logprobs(logits, labels, temperature=0.9, return_entropy=True, backend=backend)
        kl = rk.kl_penalty(lp, ref_lp, estimator="k3", backend=backend)
        adv, ret = rk.gae(rewards - 0.1 * kl, values, mask, gamma=0.99, lam=0.95, backend=backend)
        pg, stats = rk.ppo_policy_loss(lp, old_lp, adv, mask, clip_high=0.28, dual_clip=3.0,
                                       agg="seq-mean-token-mean", backend=backend)
        vf, _ = rk.ppo_value_loss(values, old_values, ret, mask, clip=0.2, backend=backend)
        dpo, _, _ = rk.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1, backend=backend)
        return pg + 0.5 * vf + ent.mean() + dpo.mean(), stats["clipfrac"]

    return step


def _step_inputs():
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 6, 45
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    mask = torch.rand(B, T, generator=g) < 0.7
    old_lp = torch.randn(B, T, generator=g) - 3
    others = [torch.randn(B, T, generator=g) for _ in range(4)]  # ref_lp, values, old_values, rewards
    dpo_in = [torch.randn(3, generator=g) * 5 - 30 for _ in range(4)]
    ref_lp = others[0] - 3
    inputs = [logits, labels, ref_lp, old_lp, mask, others[1], others[2], others[3], *dpo_in]
    grad_idx = [0, 5, 7, 8, 9]  # logits, values, rewards, policy_chosen, policy_rejected
    return inputs, grad_idx


def _run_step(fn, inputs, grad_idx):
    xs = [t.clone().to(DEVICE) for t in inputs]
    for i in grad_idx:
        xs[i].requires_grad_(True)
    loss, clipfrac = fn(*xs)
    loss.backward()
    return loss, clipfrac, [xs[i].grad for i in grad_idx]


def test_compile_fullgraph_every_op_with_backward():
    """torch.compile(fullgraph=True) over a step that calls each op and backpropagates: no graph
    break, every op in the graph is one of ours, values and gradients equal eager reference."""
    require("triton", "token_logprobs")
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(str(gm.graph))
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    inputs, grad_idx = _step_inputs()
    compiled = torch.compile(_training_step("triton"), fullgraph=True, backend=recording_aot_eager)
    loss, clipfrac, grads = _run_step(compiled, inputs, grad_idx)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    for op in ("token_logprobs_fwd", "kl_penalty_fwd", "gae_fwd", "ppo_policy_loss_fwd", "ppo_value_loss_fwd",
               "dpo_loss_fwd"):
        assert f"{NS}.{op}" in graphs[0], f"{op} missing from the compiled graph"

    ref_loss, ref_clipfrac, ref_grads = _run_step(_training_step("reference"), inputs, grad_idx)
    assert_close(loss, ref_loss.double(), "compiled loss")
    assert_close(clipfrac, ref_clipfrac.double(), "compiled clipfrac")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g is not None, f"no gradient reached input {grad_idx[i]}"
        assert_close(g, r.double(), f"compiled grad of input {grad_idx[i]}", scale=max(1.0, float(r.abs().max())))
    torch._dynamo.reset()


def _opcheck_cases():
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 3, 21

    def r(*shape, grad=True, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype).to(DEVICE).requires_grad_(grad)

    labels = torch.randint(0, V, (B * T,), generator=g)
    labels[1] = -100
    labels = labels.to(DEVICE)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(DEVICE)
    ops = _ops()
    lse = torch.randn(B * T, generator=g).to(DEVICE)
    return [
        ("token_logprobs_fwd", ops.token_logprobs_fwd, (r(B, T, V), labels, 0.7, -100, True)),
        ("token_logprobs_fwd-bf16-strided", ops.token_logprobs_fwd,
         (r(B, T + 1, V, dtype=torch.bfloat16)[:, 1:], labels, 1.0, -100, False)),
        ("token_logprobs_bwd", ops.token_logprobs_bwd,
         (r(B * T, grad=False), None, r(B, T, V, grad=False), labels, lse, r(0, grad=False), 1.0, -100)),
        ("kl_penalty_fwd", ops.kl_penalty_fwd, (r(B, T), r(B, T, dtype=torch.float16), "k3")),
        ("kl_penalty_bwd", ops.kl_penalty_bwd, (r(B, T, grad=False), r(B, T, grad=False), r(B, T, grad=False), "abs")),
        ("gae_fwd", ops.gae_fwd, (r(B, T), r(B, T), mask, 0.99, 0.95)),
        ("gae_bwd", ops.gae_bwd, (r(B, T, grad=False), None, mask, 0.9, 0.5, torch.float32, torch.bfloat16)),
        ("ppo_policy_loss_fwd", ops.ppo_policy_loss_fwd,
         (r(B, T), r(B, T), r(B, T), mask, 0.2, 0.28, 3.0, "seq-mean-token-mean")),
        ("ppo_policy_loss_fwd-token-mean", ops.ppo_policy_loss_fwd,
         (r(B, T), r(B, T), r(B, T), mask, 0.2, 0.2, None, "token-mean")),
        ("ppo_value_loss_fwd", ops.ppo_value_loss_fwd, (r(B, T), r(B, T), r(B, T), mask, 0.2, "seq-mean-token-sum")),
        ("ppo_value_loss_fwd-noclip", ops.ppo_value_loss_fwd, (r(B, T), r(B, T), r(B, T), mask, None, "token-mean")),
        ("dpo_loss_fwd", ops.dpo_loss_fwd, (r(4), r(4), r(4), r(4), 0.1, "sigmoid", 0.1)),
        ("dpo_loss_fwd-robust", ops.dpo_loss_fwd, (r(4), r(4), r(4), r(4), 0.5, "robust", 0.2)),
        ("dpo_loss_bwd", ops.dpo_loss_bwd,
         (r(4, grad=False), r(4, grad=False), r(4, grad=False), r(4, grad=False), r(4, grad=False), 0.1, "ipo", 0.0)),
    ]


@pytest.mark.parametrize("case", range(14))
def test_opcheck(case):
    """torch.library.opcheck: schema, fake (meta) implementation against the real output, autograd
    registration, and AOT dispatch with dynamic shapes."""
    require("triton", "token_logprobs")
    cases = _opcheck_cases()
    assert len(cases) == 14
    _, op, args = cases[case]
    torch.library.opcheck(op, args)


def test_every_backward_op_is_registered():
    require("triton", "token_logprobs")
    from rlhf_kernels.triton import OPS

    assert set(OPS) == set(rk.OPS)
    ops = _ops()
    for fwd in ("token_logprobs", "kl_penalty", "gae", "ppo_policy_loss", "ppo_value_loss", "dpo_loss"):
        assert hasattr(ops, f"{fwd}_fwd") and hasattr(ops, f"{fwd}_bwd")


def test_offsets_beyond_2_pow_31():
    """Rows whose element offset t * stride is beyond 2^31 (with both factors below it): forward
    and backward read and write the right rows.

    A [1, 3, V] strided view over a 2^31 + 2^18 + V element bf16 buffer; on CPU the buffer is a sparse
    memory-mapped file, so only the three rows are ever touched."""
    require("triton", "token_logprobs", torch.bfloat16)
    V = 4099
    stride = (1 << 30) + (1 << 17)  # < 2^31, but 2 * stride > 2^31
    size = 2 * stride + V
    if DEVICE == "cpu":
        tmp = os.environ.get("TMPDIR", "/tmp")
        if shutil.disk_usage(tmp).free < 2 * size * 2:  # in case the filesystem has no sparse files
            pytest.skip("not enough free disk for the memory-mapped 4 GiB buffer")
        path = os.path.join(tmp, f"rlhf-kernels-big-{os.getpid()}.bin")
        with open(path, "wb") as f:
            f.truncate(size * 2)
        try:
            buf = torch.from_file(path, shared=True, size=size, dtype=torch.bfloat16)
        finally:
            os.remove(path)  # the mapping stays valid; the file disappears with it
    else:
        free, _ = torch.cuda.mem_get_info()
        if free < size * 2 + (1 << 30):
            pytest.skip("not enough GPU memory for a 4 GiB buffer")
        buf = torch.empty(size, dtype=torch.bfloat16, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    rows = (torch.randn(3, V, generator=g, dtype=torch.float64) * 3).to(torch.bfloat16)
    for t in range(3):
        buf[t * stride: t * stride + V] = rows[t].to(buf.device)
    logits = buf.as_strided((1, 3, V), (3 * stride, stride, 1))
    labels = torch.tensor([7, V - 1, 2048], device=buf.device)
    ops = _ops()
    lp, lse, ent = ops.token_logprobs_fwd(logits, labels, 1.0, -100, True)
    grad_lp = torch.randn(3, generator=g).to(buf.device)
    grad_ent = torch.randn(3, generator=g).to(buf.device)
    grad = ops.token_logprobs_bwd(grad_lp, grad_ent, logits, labels, lse, ent, 1.0, -100)

    from .test_token_logprobs import truth

    x64 = rows.double().requires_grad_(True)
    lp64, ent64 = truth(x64, labels.cpu(), 1.0)
    ((lp64 * grad_lp.cpu().double()).sum() + (ent64 * grad_ent.cpu().double()).sum()).backward()
    assert_close(lp, lp64, "logprobs past 2^31")
    assert_close(ent, ent64, "entropy past 2^31", scale=float(ent64.detach().abs().max()))
    assert_close(grad.reshape(3, V), x64.grad, "d/dlogits past 2^31")


_AOT_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    import importlib
    # (the package re-exports functions under the same names, so import the modules explicitly)
    dpo, gae, kl, logprobs, ppo = (importlib.import_module(f"rlhf_kernels.triton.{m}")
                                   for m in ("dpo", "gae", "kl", "logprobs", "ppo"))

    target = GPUTarget("cuda", 90, 32)
    D16 = [["tt.divisibility", 16]]

    def build(fn, sig, consts, aligned=(), num_warps=4):
        names = fn.arg_names
        attrs = {(names.index(n),): D16 for n in aligned}
        k = compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                    options={"num_warps": num_warps})
        assert len(k.asm["cubin"]) > 0
        return k

    # token_logprobs at H100 launch settings, contiguous bf16 rows (stride_v specialised to 1, as a
    # JIT launch does): the logits loads must be 16-byte vector loads, exp2 one ex2.approx.ftz.
    lp_sig = {"logits_ptr": "*bf16", "labels_ptr": "*i64", "logprob_ptr": "*fp32", "lse_ptr": "*fp32",
              "entropy_ptr": "*fp32", "T": "i32", "V": "i32", "stride_a": "i64", "stride_t": "i32",
              "stride_v": "constexpr", "scale": "fp32", "ignore_index": "i64",
              "RETURN_ENTROPY": "constexpr", "BLOCK_V": "constexpr", "VOCAB_CONTIG": "constexpr",
              "ALIGN": "constexpr", "FAST_EXP2": "constexpr"}
    fwd_c = {"stride_v": 1, "RETURN_ENTROPY": True, "BLOCK_V": 8192, "VOCAB_CONTIG": True, "ALIGN": 8,
             "FAST_EXP2": True}
    k = build(logprobs._token_logprobs_fwd_kernel, lp_sig, fwd_c,
              aligned=("logits_ptr", "V", "stride_a", "stride_t"), num_warps=16)
    assert "ld.global.v4.b32" in k.asm["ptx"], "logits loads are not vectorized"
    assert "ex2.approx.ftz.f32" in k.asm["ptx"], "exp2 is not the ftz approximation"
    # V and the row strides NOT multiples of 16 (V = 32001): the aligned main loop still vectorizes.
    k = build(logprobs._token_logprobs_fwd_kernel, lp_sig, fwd_c, aligned=("logits_ptr",), num_warps=16)
    assert "ld.global.v4.b32" in k.asm["ptx"], "no vector loads when V is not a multiple of 16"
    for bv, nw in logprobs._GPU_CONFIGS:  # every autotune config lowers (entropy off, fp32 rows)
        build(logprobs._token_logprobs_fwd_kernel, {**lp_sig, "logits_ptr": "*fp32"},
              {**fwd_c, "RETURN_ENTROPY": False, "BLOCK_V": bv, "ALIGN": 4}, aligned=("logits_ptr",), num_warps=nw)
    # A vocabulary stride other than 1: the 64-bit column offsets must compile too.
    build(logprobs._token_logprobs_fwd_kernel, {**lp_sig, "stride_v": "i32"},
          {"RETURN_ENTROPY": True, "BLOCK_V": 8192, "VOCAB_CONTIG": False, "ALIGN": 1, "FAST_EXP2": True},
          num_warps=16)
    bwd_sig = {"grad_lp_ptr": "*fp32", "grad_ent_ptr": "*fp32", "logits_ptr": "*bf16", "labels_ptr": "*i64",
               "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "grad_logits_ptr": "*bf16", "T": "i32", "V": "i32",
               "stride_a": "i64", "stride_t": "i32", "stride_v": "constexpr", "scale": "fp32", "inv_t": "fp32",
               "ignore_index": "i64", "HAS_GRAD_LP": "constexpr", "HAS_GRAD_ENT": "constexpr",
               "BLOCK_V": "constexpr", "SOFT_BF16": "constexpr", "VOCAB_CONTIG": "constexpr",
               "ALIGN": "constexpr", "OUT_ALIGNED": "constexpr", "FAST_EXP2": "constexpr"}
    bwd_c = {"stride_v": 1, "HAS_GRAD_LP": True, "HAS_GRAD_ENT": True, "BLOCK_V": 8192, "SOFT_BF16": False,
             "VOCAB_CONTIG": True, "ALIGN": 8, "OUT_ALIGNED": True, "FAST_EXP2": True}
    k = build(logprobs._token_logprobs_bwd_kernel, bwd_sig, bwd_c,
              aligned=("logits_ptr", "grad_logits_ptr", "V", "stride_a", "stride_t"), num_warps=16)
    assert "ld.global.v4.b32" in k.asm["ptx"], "backward logits loads are not vectorized"
    assert "st.global.v4.b32" in k.asm["ptx"], "gradient stores are not vectorized"
    k = build(logprobs._token_logprobs_bwd_kernel, bwd_sig, bwd_c, aligned=("logits_ptr", "grad_logits_ptr"),
              num_warps=16)
    assert "st.global.v4.b32" in k.asm["ptx"], "no vector stores when V is not a multiple of 16"
    build(logprobs._token_logprobs_bwd_kernel, {**bwd_sig, "stride_v": "i32"},
          {"HAS_GRAD_LP": True, "HAS_GRAD_ENT": True, "BLOCK_V": 8192, "SOFT_BF16": False, "VOCAB_CONTIG": False,
           "ALIGN": 1, "OUT_ALIGNED": False, "FAST_EXP2": True},
          num_warps=16)

    build(kl._kl_fwd_kernel, {"lp_ptr": "*fp32", "ref_ptr": "*bf16", "out_ptr": "*fp32", "n": "i32",
                              "ESTIMATOR": "constexpr", "BLOCK": "constexpr"}, {"ESTIMATOR": 2, "BLOCK": 1024})
    build(kl._kl_bwd_kernel, {"grad_ptr": "*fp32", "lp_ptr": "*bf16", "ref_ptr": "*fp32", "grad_lp_ptr": "*bf16",
                              "grad_ref_ptr": "*fp32", "n": "i32", "ESTIMATOR": "constexpr", "BLOCK": "constexpr",
                              "SOFT_BF16": "constexpr"}, {"ESTIMATOR": 3, "BLOCK": 1024, "SOFT_BF16": False})
    build(gae._gae_fwd_kernel, {"rewards_ptr": "*fp32", "values_ptr": "*bf16", "mask_ptr": "*u8", "adv_ptr": "*fp32",
                                "ret_ptr": "*fp32", "B": "i32", "T": "i32", "gamma": "fp32", "lam": "fp32",
                                "BLOCK_B": "constexpr"}, {"BLOCK_B": 32}, num_warps=1)
    build(gae._gae_bwd_kernel, {"grad_adv_ptr": "*fp32", "grad_ret_ptr": "*fp32", "mask_ptr": "*u8",
                                "grad_rewards_ptr": "*fp32", "grad_values_ptr": "*bf16", "B": "i32", "T": "i32",
                                "gamma": "fp32", "lam": "fp32", "HAS_GRAD_ADV": "constexpr",
                                "HAS_GRAD_RET": "constexpr", "BLOCK_B": "constexpr", "SOFT_BF16": "constexpr"},
          {"HAS_GRAD_ADV": True, "HAS_GRAD_RET": True, "BLOCK_B": 32, "SOFT_BF16": False}, num_warps=1)
    row = {"R": "i32", "T": "i32", "n": "i32"}
    pin = {"lp_ptr": "*bf16", "old_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*u8", "partials_ptr": "*fp32"}
    build(ppo._policy_fwd_kernel, {**pin, **row, "clip_low": "fp32", "clip_high": "fp32", "dual_clip": "fp32",
                                   "HAS_DUAL": "constexpr", "BLOCK_T": "constexpr"},
          {"HAS_DUAL": True, "BLOCK_T": 1024})
    build(ppo._policy_bwd_kernel, {"grad_out_ptr": "*fp32", "lp_ptr": "*bf16", "old_ptr": "*fp32", "adv_ptr": "*fp32",
                                   "mask_ptr": "*u8", "out_ptr": "*fp32", "partials_ptr": "*fp32",
                                   "grad_lp_ptr": "*bf16", "grad_old_ptr": "*fp32", "grad_adv_ptr": "*fp32", **row,
                                   "n_seq": "fp32", "clip_low": "fp32", "clip_high": "fp32", "dual_clip": "fp32",
                                   "HAS_DUAL": "constexpr", "AGG": "constexpr", "BLOCK_T": "constexpr",
                                   "SOFT_BF16": "constexpr"},
          {"HAS_DUAL": True, "AGG": 1, "BLOCK_T": 1024, "SOFT_BF16": False})
    vin = {"v_ptr": "*fp32", "old_ptr": "*fp32", "ret_ptr": "*fp32", "mask_ptr": "*u8", "partials_ptr": "*fp32"}
    build(ppo._value_fwd_kernel, {**vin, **row, "clip": "fp32", "HAS_CLIP": "constexpr", "BLOCK_T": "constexpr"},
          {"HAS_CLIP": True, "BLOCK_T": 1024})
    build(ppo._value_bwd_kernel, {"grad_out_ptr": "*fp32", "v_ptr": "*fp32", "old_ptr": "*fp32", "ret_ptr": "*fp32",
                                  "mask_ptr": "*u8", "out_ptr": "*fp32", "partials_ptr": "*fp32",
                                  "grad_v_ptr": "*fp32", "grad_old_ptr": "*fp32", "grad_ret_ptr": "*fp32", **row,
                                  "n_seq": "fp32", "clip": "fp32", "loss_scale": "fp32", "HAS_CLIP": "constexpr",
                                  "AGG": "constexpr", "BLOCK_T": "constexpr", "SOFT_BF16": "constexpr"},
          {"HAS_CLIP": True, "AGG": 0, "BLOCK_T": 1024, "SOFT_BF16": False})
    build(ppo._finalize_kernel, {"partials_ptr": "*fp32", "out_ptr": "*fp32", "R": "i32", "n_seq": "fp32",
                                 "loss_scale": "fp32", "AGG": "constexpr", "BLOCK_R": "constexpr"},
          {"AGG": 2, "BLOCK_R": 1024})
    d = {"pc_ptr": "*fp32", "pr_ptr": "*fp32", "rc_ptr": "*fp32", "rr_ptr": "*fp32"}
    build(dpo._dpo_fwd_kernel, {**d, "loss_ptr": "*fp32", "chosen_ptr": "*fp32", "rejected_ptr": "*fp32",
                                "B": "i32", "beta": "fp32", "ls": "fp32", "LOSS": "constexpr", "BLOCK": "constexpr"},
          {"LOSS": 0, "BLOCK": 1024})
    build(dpo._dpo_bwd_kernel, {"grad_ptr": "*fp32", **d, "g_pc_ptr": "*bf16", "g_pr_ptr": "*fp32",
                                "g_rc_ptr": "*fp32", "g_rr_ptr": "*fp32", "B": "i32", "beta": "fp32", "ls": "fp32",
                                "LOSS": "constexpr", "BLOCK": "constexpr", "SOFT_BF16": "constexpr"},
          {"LOSS": 3, "BLOCK": 1024, "SOFT_BF16": False})
    print("AOT-OK")
""")


def test_kernels_lower_to_sm90_cubin():
    """Every forward and backward kernel compiles ahead of time for an H100 (sm_90) to PTX and a
    cubin, with no GPU: catches code the interpreter accepts but the compiler rejects."""
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - a triton build without the NVIDIA backend
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], check=False, capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "ptxas" in out and ("not found" in out or "No such file" in out):
        pytest.skip("no ptxas for the NVIDIA backend on this machine")
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, out[-4000:]


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    """'auto' on CUDA tensors resolves to the Triton kernels (decided from data, no GPU needed)."""
    require("triton", "token_logprobs")
    from rlhf_kernels._dispatch import resolve
    from rlhf_kernels.triton import OPS

    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    for op in rk.OPS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            name, fn = resolve(op, "auto", torch.device("cuda"), (dtype,))
            assert name == "triton" and fn is OPS[op], f"{op}/{dtype}: auto picked {name}"


def test_vocab_262144():
    """A 256k vocabulary (Gemma-size), bf16, two rows: values and gradients against float64."""
    require("triton", "token_logprobs", torch.bfloat16)
    from .test_token_logprobs import run_and_check

    V = 262144
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, V, generator=g, dtype=torch.float64) * 4).to(torch.bfloat16)
    labels = torch.tensor([V - 1, 131071])
    run_and_check("triton", logits, labels, 0.8, True, "V=262144")


def test_ppo_policy_gradient_at_ties_matches_torch():
    """Zero advantages with the ratio outside the clip range make the clipped and unclipped terms
    equal (both 0): torch's max splits the gradient between them, and so must the kernel."""
    require("triton", "ppo_policy_loss")
    from .test_losses import policy_truth

    lp = torch.tensor([[0.5, -0.5, 0.05, 0.3]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    leaves = [t.clone().to(DEVICE).requires_grad_(True) for t in (lp, old, adv)]
    loss, _ = rk.ppo_policy_loss(*leaves, m.to(DEVICE), dual_clip=2.0, backend="triton")
    loss.backward()
    t64 = [t.double().requires_grad_(True) for t in (lp, old, adv)]
    loss64, _, _ = policy_truth(*t64, m, 0.2, 0.2, 2.0, "token-mean")
    loss64.backward()
    assert_close(loss, loss64, "loss at ties")
    for leaf, ref, name in zip(leaves, t64, ("logprobs", "old_logprobs", "advantages")):
        assert_close(leaf.grad, ref.grad, f"d/d{name} at ties")
