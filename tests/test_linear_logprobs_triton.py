"""Triton linear_token_logprobs (hidden states -> per-token log-probs without the [N, V] logits):
the custom ops and their autograd against a float64 truth computed here, unfused, from the formula
y = hidden @ weight.T + bias; z = logit_scale * y; z = softcap * tanh(z / softcap); z = z / T.

Shapes are small and not multiples of the kernels' blocks (under the interpreter: 16 rows x 32
vocabulary columns x 16 of H per tile, backward chunks of 64 columns), so every case crosses tile
and chunk edges."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from .utils import DEVICE, TOL, Tol, assert_close

triton = pytest.importorskip("triton")
lin = pytest.importorskip("rlhf_kernels.triton.linear_logprobs")

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):  # pragma: no cover
    pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1", allow_module_level=True)

OPS = torch.ops.rlhf_kernels_triton
IGNORE = -100


def truth(hidden, weight, bias, labels, scale, softcap, temperature, ignore_index=IGNORE):
    """float64, unfused: (logprobs, entropy, mean_logit, is_top1), zeros at ignored rows."""
    y = hidden.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    z = scale * y
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logp = torch.log_softmax(z, dim=-1)
    lp = torch.where(valid, logp.gather(-1, safe[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    mean = torch.where(valid, z.mean(-1), 0.0)
    top1 = valid & (z.argmax(-1) == labels)
    return lp, ent, mean, top1


def make(N, H, V, dtype, with_bias=True, seed=0, n_ignored=3, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=torch.float64) * spread / H ** 0.25).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.25).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    if n_ignored:
        labels[torch.randperm(N, generator=g)[:n_ignored]] = IGNORE
    return hidden, weight, bias, labels


def run(hidden, weight, bias, labels, scale=1.0, softcap=0.0, temperature=1.0, entropy=True, extras=True,
        grad_seed=1):
    """Forward + backward through the custom op's autograd; returns outputs and the three grads."""
    leaves = [t.clone().to(DEVICE).requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    lp, lse, ent, mean, top1 = OPS.linear_token_logprobs_fwd(h, w, b, labels.to(DEVICE), scale, softcap,
                                                             temperature, IGNORE, entropy, extras)
    g = torch.Generator().manual_seed(grad_seed)
    g_lp = torch.randn(lp.shape, generator=g).to(DEVICE)
    g_ent = torch.randn(lp.shape, generator=g).to(DEVICE)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    loss.backward()
    return (lp, lse, ent, mean, top1), [t.grad if t is not None else None for t in leaves], (g_lp, g_ent)


def check(hidden, weight, bias, labels, scale=1.0, softcap=0.0, temperature=1.0, entropy=True, name=""):
    (lp, lse, ent, mean, top1), grads, (g_lp, g_ent) = run(hidden, weight, bias, labels, scale, softcap,
                                                             temperature, entropy)
    leaves64 = [t.double().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    lp64, ent64, mean64, top164 = truth(*leaves64[:2], leaves64[2], labels, scale, softcap, temperature)
    loss64 = (lp64 * g_lp.cpu().double()).sum() + ((ent64 * g_ent.cpu().double()).sum() if entropy else 0.0)
    loss64.backward()
    vt = TOL[torch.float32] if hidden.dtype == torch.float32 else Tol(1e-4, 1e-4)
    assert_close(lp, lp64, f"{name} logprobs", vt, scale=1 + float(lp64.detach().abs().max()))
    if entropy:
        assert_close(ent, ent64, f"{name} entropy", vt, scale=1 + float(ent64.detach().abs().max()))
    else:
        assert ent.numel() == 0
    assert_close(mean, mean64, f"{name} mean_logit", vt, scale=1 + float(mean64.detach().abs().max()))
    assert top1.dtype == torch.bool and torch.equal(top1.cpu(), top164), f"{name} is_top1"
    assert lse.dtype == torch.float32 and bool((lse.cpu()[labels == IGNORE] == 0).all())
    for got, ref, what in zip(grads, leaves64, ("hidden", "weight", "bias")):
        if ref is None:
            assert got is None
            continue
        assert got.dtype == hidden.dtype and got.shape == ref.shape
        if hidden.dtype == torch.float32:
            assert_close(got, ref.grad, f"{name} d/d{what}", scale=float(ref.grad.abs().max()))
        else:
            check_low_precision_grad(got, ref.grad, what, leaves64, labels, g_lp, g_ent, scale, softcap, temperature,
                                     entropy, name)
    # ignored rows: no gradient to their hidden states
    assert bool((grads[0].cpu()[labels == IGNORE] == 0).all()), f"{name}: gradient at ignored rows"


def check_low_precision_grad(got, expected, what, leaves64, labels, g_lp, g_ent, scale, softcap, temperature,
                             entropy, name):
    """bf16/fp16 gradients: the kernels round g_y = dL/dy to the input dtype (unit roundoff u) before
    the two gradient matmuls and accumulate in fp32, then round the result once.  So elementwise
    |error| <= u * (|g_y| @ |W|) (hidden; |g_y|.T @ |h| for the weight) + u * |grad|, up to fp32
    noise; g_y is the float64 truth's."""
    h64, w64, b64 = (t.detach() if t is not None else None for t in leaves64)
    y = (h64 @ w64.T + (b64 if b64 is not None else 0.0)).requires_grad_(True)
    z = scale * y
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    valid = labels != IGNORE
    lp = torch.where(valid, logp.gather(-1, torch.where(valid, labels, 0)[:, None])[:, 0], 0.0)
    loss = (lp * g_lp.cpu().double()).sum()
    if entropy:
        loss = loss + (torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0) * g_ent.cpu().double()).sum()
    (gy,) = torch.autograd.grad(loss, y)
    u = 2.0 ** -8 if got.dtype == torch.bfloat16 else 2.0 ** -11
    if what == "hidden":
        bound = u * (gy.abs() @ w64.abs())
    elif what == "weight":
        bound = u * (gy.abs().T @ h64.abs())
    else:
        bound = torch.zeros_like(expected)
    allowed = bound + u * expected.abs() + 1e-6 * (1 + float(expected.abs().max()))
    diff = (got.double().cpu() - expected).abs()
    worst = int((diff - allowed).argmax())
    assert bool((diff <= allowed).all()), (
        f"{name} d/d{what}: |diff| {diff.flatten()[worst].item():.3g} > allowed {allowed.flatten()[worst].item():.3g}"
        f" at flat index {worst} (actual {got.flatten()[worst].item()!r}, expected {expected.flatten()[worst].item()!r})")


@pytest.mark.parametrize("N,H,V,dtype,with_bias,scale,softcap,temperature", [
    pytest.param(13, 20, 77, torch.float32, True, 1.0, 0.0, 1.0, id="fp32-plain"),
    pytest.param(37, 48, 131, torch.float32, False, 0.5, 0.0, 0.7, id="fp32-nobias-scale-T"),
    pytest.param(21, 33, 100, torch.float32, True, 1.3, 2.5, 1.4, id="fp32-softcap"),
    pytest.param(19, 16, 67, torch.bfloat16, True, 1.0, 3.0, 0.9, id="bf16-softcap"),
    pytest.param(11, 40, 90, torch.float16, False, 2.0, 0.0, 1.0, id="fp16"),
])
def test_values_and_gradients_against_float64(N, H, V, dtype, with_bias, scale, softcap, temperature):
    check(*make(N, H, V, dtype, with_bias), scale=scale, softcap=softcap, temperature=temperature,
          name=f"{N}x{H}x{V}/{dtype}")


def test_max_moving_across_vocabulary_tiles():
    """Logits rising along the vocabulary (bias = 0..30) so every row's max moves at each tile:
    the running sums must be rescaled (a missing rescale is off by far more than the tolerance)."""
    hidden, weight, _, labels = make(17, 24, 99, torch.float32)
    bias = torch.linspace(0.0, 30.0, 99)
    labels[:4] = torch.tensor([0, 40, 98, 70])
    check(hidden, weight, bias, labels, name="rising")


def test_logprobs_only_and_entropy_only_gradients():
    """Entropy not requested (empty tensor, gradient from logprobs alone); then a loss on entropy
    alone (grad_logprobs is None in autograd)."""
    hidden, weight, bias, labels = make(9, 18, 45, torch.float32, seed=2)
    check(hidden, weight, bias, labels, temperature=0.8, entropy=False, name="no-entropy")

    h = hidden.clone().requires_grad_(True)
    _, _, ent, _, _ = OPS.linear_token_logprobs_fwd(h, weight, bias, labels, 1.0, 0.0, 0.8, IGNORE, True, False)
    ent.sum().backward()
    h64 = hidden.double().requires_grad_(True)
    _, ent64, _, _ = truth(h64, weight, bias, labels, 1.0, 0.0, 0.8)
    ent64.sum().backward()
    assert_close(h.grad, h64.grad, "d entropy / d hidden", scale=float(h64.grad.abs().max()))


def test_output_mask_only_weight():
    """Only the weight needs a gradient: the backward op returns empty tensors for the others."""
    hidden, weight, bias, labels = make(10, 20, 50, torch.float32, seed=3)
    lp, lse, ent, _, _ = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, 1.0, 0.0, 1.0, IGNORE, True,
                                                       False)
    g = torch.ones(10)
    gh, gw, gb = OPS.linear_token_logprobs_bwd(g, None, hidden, weight, bias, labels, lse, ent, 1.0, 0.0, 1.0,
                                               IGNORE, [False, True, False])
    assert gh.numel() == 0 and gb.numel() == 0 and gw.shape == weight.shape
    w64 = weight.double().requires_grad_(True)
    truth(hidden, w64, bias, labels, 1.0, 0.0, 1.0)[0].sum().backward()
    assert_close(gw, w64.grad, "d/dweight", scale=float(w64.grad.abs().max()))


def test_all_rows_ignored_and_ignored_rows_never_read():
    """All labels ignored: zeros everywhere, zero gradients.  NaN hidden states at ignored rows
    (never projected) leak into no output and no gradient."""
    hidden, weight, bias, labels = make(8, 16, 40, torch.float32, seed=4, n_ignored=0)
    (lp, lse, ent, mean, top1), (gh, gw, gb), _ = run(hidden, weight, bias, torch.full((8,), IGNORE))
    for t in (lp, lse, ent, mean, gh, gw, gb):
        assert bool((t == 0).all())
    assert not bool(top1.any())

    labels[[1, 5]] = IGNORE
    poisoned = hidden.clone()
    poisoned[[1, 5]] = float("nan")
    (lp, lse, ent, mean, top1), (gh, gw, gb), _ = run(poisoned, weight, bias, labels)
    for t in (lp, lse, ent, mean, gh, gw, gb):
        assert bool(torch.isfinite(t).all())
    check(poisoned.masked_fill(torch.isnan(poisoned), 0.0), weight, bias, labels, name="after-nan")
    (lp2, *_), (gh2, gw2, gb2), _ = run(poisoned.nan_to_num(0.0), weight, bias, labels)
    assert torch.equal(lp, lp2) and torch.equal(gw, gw2) and torch.equal(gb, gb2)


def test_is_top1_first_index_wins_ties():
    """Duplicate weight rows tie exactly at the maximum: the earliest index is the argmax, within a
    tile (columns 3 and 9) and across tiles (5 and 40, 32-column tiles under the interpreter)."""
    H, V = 16, 70
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(V, H, generator=g) * 0.05
    weight[3] = weight[9] = torch.nn.functional.one_hot(torch.tensor(0), H) * 3.0
    weight[5] = weight[40] = torch.nn.functional.one_hot(torch.tensor(1), H) * 3.0
    hidden = torch.zeros(6, H)
    hidden[:3, 0] = 2.0
    hidden[3:, 1] = 2.0
    labels = torch.tensor([3, 9, IGNORE, 5, 40, 41])
    _, _, _, _, top1 = OPS.linear_token_logprobs_fwd(hidden, weight, None, labels, 1.0, 0.0, 1.0, IGNORE, False,
                                                     True)
    z = hidden.double() @ weight.double().T
    assert z[0, 3] == z[0, 9] and z[3, 5] == z[3, 40] and int(z[0].argmax()) == 3 and int(z[3].argmax()) == 5
    assert top1.tolist() == [True, False, False, True, False, False]
    assert top1.tolist() == truth(hidden, weight, None, labels, 1.0, 0.0, 1.0)[3].tolist()


def test_tied_embeddings_gradient_sums():
    """The head weight is also the input embedding (tie_word_embeddings): autograd adds both uses."""
    V, H = 60, 24
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    ids = torch.randint(0, V, (12,), generator=g)
    labels = torch.randint(0, V, (12,), generator=g)
    labels[2] = IGNORE
    w = emb.float().requires_grad_(True)
    hidden = torch.tanh(w[ids] * 1.5)
    lp = OPS.linear_token_logprobs_fwd(hidden, w, None, labels, 1.0, 0.0, 1.0, IGNORE, False, False)[0]
    lp.sum().backward()
    w64 = emb.clone().requires_grad_(True)
    truth(torch.tanh(w64[ids] * 1.5), w64, None, labels, 1.0, 0.0, 1.0)[0].sum().backward()
    assert_close(w.grad, w64.grad, "tied d/dweight", scale=float(w64.grad.abs().max()))


def test_out_of_range_label_gives_nan_for_that_row_only():
    hidden, weight, bias, labels = make(6, 16, 40, torch.float32, seed=7, n_ignored=0)
    labels[2] = 40
    lp = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, 1.0, 0.0, 1.0, IGNORE, False, False)[0]
    assert bool(torch.isnan(lp[2])) and bool(torch.isfinite(lp[[0, 1, 3, 4, 5]]).all())


def test_backward_is_deterministic():
    hidden, weight, bias, labels = make(40, 20, 150, torch.bfloat16, seed=8)
    _, grads_a, _ = run(hidden, weight, bias, labels, softcap=5.0)
    _, grads_b, _ = run(hidden, weight, bias, labels, softcap=5.0)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_opcheck_fwd_and_bwd():
    """Fake impls, schemas and autograd registration agree with the real ops."""
    hidden, weight, bias, labels = make(7, 16, 35, torch.float32, seed=9, n_ignored=2)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(OPS.linear_token_logprobs_fwd,
                          (hidden, weight, bias, labels, 1.0, 4.0, 0.9, IGNORE, True, True))
    lp, lse, ent, _, _ = OPS.linear_token_logprobs_fwd(hidden.detach(), weight.detach(), bias, labels, 1.0, 4.0,
                                                       0.9, IGNORE, True, False)
    torch.library.opcheck(OPS.linear_token_logprobs_bwd,
                          (torch.randn(7), torch.randn(7), hidden.detach(), weight.detach(), bias, labels, lse, ent,
                           1.0, 4.0, 0.9, IGNORE, [True, True, True]),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the op and its backward without a graph break."""
    hidden, weight, bias, labels = make(9, 16, 40, torch.float32, seed=10)

    def f(h, w, b):
        lp, _, ent, _, _ = OPS.linear_token_logprobs_fwd(h, w, b, labels, 1.0, 0.0, 0.9, IGNORE, True, False)
        return (lp + 0.1 * ent).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    cf(*leaves).backward()
    eager = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    f(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.equal(a.grad, b.grad)


_AOT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "0"
    import importlib
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    m = importlib.import_module("rlhf_kernels.triton.linear_logprobs")
    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig, consts, warps=8):
        k = compile(ASTSource(fn, sig, constexprs=consts), target=target, options={"num_warps": warps})
        assert len(k.asm["cubin"]) > 0
        return k

    for dt, prec, (bm, bn, bk, bh) in (("bf16", "tf32", (64, 128, 64, 128)), ("fp32", "ieee", (64, 64, 32, 64))):
        # the launchers' GPU block configuration for this dtype must be the one compiled here
        import torch
        tdt = torch.bfloat16 if dt == "bf16" else torch.float32
        assert m._fwd_config(tdt)[:3] == (bm, bn, bk) and m._bwd_config(tdt)[:4] == (bm, bn, bk, bh)
        low = dt != "fp32"
        sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "labels_ptr": "*i64", "order_ptr": "*i64",
               "count_ptr": "*i32", "logprob_ptr": "*fp32", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
               "mean_ptr": "*fp32", "top1_ptr": "*i8", "H": "i32", "V": "i32", "stride_h": "i32",
               "stride_w": "i32", "logit_scale": "fp32", "softcap": "fp32", "temperature": "fp32",
               "HAS_BIAS": "constexpr", "SOFTCAP": "constexpr", "WITH_ENTROPY": "constexpr",
               "WITH_EXTRAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
               "PRECISION": "constexpr", "UPCAST": "constexpr"}
        build(m._fwd_kernel, sig, {"HAS_BIAS": True, "SOFTCAP": True, "WITH_ENTROPY": True, "WITH_EXTRAS": True,
                                   "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PRECISION": prec, "UPCAST": False})
        sig = {"grad_lp_ptr": "*fp32", "grad_ent_ptr": "*fp32", "h_ptr": f"*{dt}", "w_ptr": f"*{dt}",
               "b_ptr": f"*{dt}", "labels_ptr": "*i64", "order_ptr": "*i64", "count_ptr": "*i32",
               "lse_ptr": "*fp32", "entropy_ptr": "*fp32", "gy_ptr": "*fp32", "keep_ptr": "*i8", "H": "i32", "V": "i32",
               "C": "i32", "c0": "i32", "stride_h": "i32", "stride_w": "i32", "n_tiles_n": "i32",
               "logit_scale": "fp32", "softcap": "fp32", "temperature": "fp32", "filter_eps": "fp32",
               "HAS_BIAS": "constexpr", "SOFTCAP": "constexpr", "HAS_GRAD_ENT": "constexpr", "FILTER": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "PRECISION": "constexpr", "UPCAST": "constexpr"}
        for filt in (False, True):
            build(m._gy_kernel, sig, {"HAS_BIAS": True, "SOFTCAP": True, "HAS_GRAD_ENT": True, "FILTER": filt,
                                      "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PRECISION": prec,
                                      "UPCAST": False})
        sig = {"gy_ptr": "*fp32", "w_ptr": f"*{dt}", "order_ptr": "*i64", "count_ptr": "*i32", "acc_ptr": "*fp32",
               "keep_ptr": "*i8", "H": "i32", "C": "i32", "Cc": "i32", "c0": "i32", "stride_w": "i32",
               "n_tiles_n": "i32", "LOW": "constexpr", "SOFT_BF16": "constexpr", "FILTER": "constexpr",
               "TILE_N": "constexpr", "BLOCK_M": "constexpr", "BLOCK_H": "constexpr", "BLOCK_K": "constexpr",
               "PRECISION": "constexpr", "UPCAST": "constexpr"}
        for filt in (False, True):
            build(m._grad_hidden_kernel, sig, {"LOW": low, "SOFT_BF16": False, "FILTER": filt, "TILE_N": bn,
                                               "BLOCK_M": bm, "BLOCK_H": bh, "BLOCK_K": bk, "PRECISION": prec,
                                               "UPCAST": False})
        sig = {"gy_ptr": "*fp32", "h_ptr": f"*{dt}", "order_ptr": "*i64", "count_ptr": "*i32", "gw_ptr": f"*{dt}",
               "keep_ptr": "*i8", "H": "i32", "C": "i32", "Cc": "i32", "c0": "i32", "stride_h": "i32",
               "n_tiles_n": "i32", "LOW": "constexpr", "SOFT_BF16": "constexpr", "FILTER": "constexpr",
               "TILE_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_H": "constexpr", "BLOCK_K": "constexpr",
               "PRECISION": "constexpr", "UPCAST": "constexpr"}
        for filt in (False, True):
            build(m._grad_weight_kernel, sig, {"LOW": low, "SOFT_BF16": False, "FILTER": filt, "TILE_M": bm,
                                               "BLOCK_N": bn, "BLOCK_H": bh, "BLOCK_K": bk, "PRECISION": prec,
                                               "UPCAST": False})
    print("AOT-OK")
""")


def test_kernels_lower_to_sm90_cubin():
    """The four kernels compile ahead of time for an H100 (sm_90) at the launchers' GPU block sizes
    (the interpreter accepts code, e.g. tl.dot tiles under 16, that the compiler rejects)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, cwd=root, timeout=900)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "ptxas" in out and ("not found" in out or "No such file" in out):
        pytest.skip("no ptxas for the NVIDIA backend on this machine")
    assert proc.returncode == 0 and "AOT-OK" in proc.stdout, out[-4000:]


def test_opt_in_gradient_filtering_error_bound():
    """filter_eps (opt-in, launcher level): blocks whose probabilities are all below eps and that
    hold no label are skipped.  Checks: such vocabulary tiles get exactly zero weight/bias gradient
    where the exact one is not zero; every gradient stays within the documented bound
    (logit_scale / T) * eps * (|g_lp| + |g_ent| (|log eps| + H)) summed against |W| or |h|; eps = 0
    and an eps below every probability give the unfiltered bits."""
    N, H, V, T, scale, eps = 30, 16, 300, 0.9, 1.2, 1e-3
    hidden, weight, bias, labels = make(N, H, V, torch.float32, seed=11, n_ignored=4)
    # labels in the first 64 columns; columns 64..95 hold a few probabilities above eps and no
    # label (kept); past column 96 the mass is negligible (skipped), except the tile of label 250
    col = torch.arange(V)
    bias = torch.where(col < 64, 2.0, torch.where(col < 96, -1.0, -9.0)) + 0.1 * bias
    labels = torch.where(labels == IGNORE, IGNORE, labels % 64)
    labels[0] = 250  # a label in an otherwise negligible tile: that block is kept
    lp, lse, ent, _, _ = OPS.linear_token_logprobs_fwd(hidden, weight, bias, labels, scale, 0.0, T, IGNORE, True,
                                                       False)
    g = torch.Generator().manual_seed(12)
    g_lp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    valid = labels != IGNORE
    z = (scale * (hidden.double() @ weight.double().T + bias.double())) / T
    p = torch.softmax(z, -1)
    ent64 = torch.where(valid, -(p * torch.log(p)).sum(-1), 0.0)
    bn = lin._bwd_config(torch.float32)[1]
    for grad_ent in (None, g_ent):  # logprobs alone (the tight bound), then with the entropy term
        args = (g_lp, grad_ent, hidden, weight, bias, labels, lse, ent, scale, 0.0, T, IGNORE, [True, True, True])
        exact = lin.linear_token_logprobs_backward(*args)
        filtered = lin.linear_token_logprobs_backward(*args, filter_eps=eps)
        for a, b in zip(exact, lin.linear_token_logprobs_backward(*args, filter_eps=0.0)):
            assert torch.equal(a, b)
        for a, b in zip(exact, lin.linear_token_logprobs_backward(*args, filter_eps=1e-30)):
            assert torch.equal(a, b)

        skipped = []
        for t0 in range(0, V, bn):
            cols = slice(t0, min(t0 + bn, V))
            holds_label = bool(((labels[valid] >= t0) & (labels[valid] < t0 + bn)).any())
            if float(p[valid][:, cols].max()) < eps and not holds_label:
                skipped.append(t0)
                assert bool((filtered[1][cols] == 0).all()) and bool((filtered[2][cols] == 0).all())
                assert bool((exact[1][cols] != 0).any())
        assert skipped and 240 // bn * bn not in skipped  # the tile holding label 250 is kept
        assert 64 not in skipped and float(p[valid][:, 64:96].max()) > 3 * eps
        assert not torch.equal(exact[0], filtered[0])

        per_row = g_lp.double().abs()
        if grad_ent is not None:
            per_row = per_row + g_ent.double().abs() * (abs(math.log(eps)) + ent64)
        per_row = torch.where(valid, (scale / T) * eps * per_row, 0.0)
        bound_h = per_row[:, None] * weight.double().abs().sum(0)[None, :]
        bound_w = (per_row @ hidden.double().abs())[None, :].expand(V, H)
        bound_b = per_row.sum().expand(V)
        # Tighter: only entries with p < eps (and not the label) can be dropped, each by its own |g_y|.
        y = (hidden.double() @ weight.double().T + bias.double()).requires_grad_(True)
        logp = torch.log_softmax(scale * y / T, -1)
        safe = torch.where(valid, labels, 0)
        loss = (torch.where(valid, logp.gather(-1, safe[:, None])[:, 0], 0.0) * g_lp.double()).sum()
        if grad_ent is not None:
            loss = loss + (torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0) * g_ent.double()).sum()
        (gy,) = torch.autograd.grad(loss, y)
        droppable = (p < eps) & valid[:, None] & (torch.arange(V)[None, :] != labels[:, None])
        dropped = torch.where(droppable, gy.abs(), 0.0)
        tight_h = dropped @ weight.double().abs()
        tight_w = dropped.T @ hidden.double().abs()
        tight_b = dropped.sum(0)
        for got, ref, bound, tight, what in ((filtered[0], exact[0], bound_h, tight_h, "hidden"),
                                             (filtered[1], exact[1], bound_w, tight_w, "weight"),
                                             (filtered[2], exact[2], bound_b, tight_b, "bias")):
            diff = (got.double() - ref.double()).abs()
            assert bool((diff <= bound + 1e-6).all()), f"d/d{what}: {float((diff - bound).max()):.3g} over the bound"
            assert bool((diff <= tight + 1e-6).all()), f"d/d{what}: {float((diff - tight).max()):.3g} over the mass of p < eps"


def test_backend_entry_point_shapes_and_registration():
    """The backend function behind @register_impl: [..., H] hidden and [...] labels in, outputs
    shaped like labels, only the requested extras; registered exactly when the public op exists."""
    import rlhf_kernels as rk
    from rlhf_kernels._registry import impls

    assert ("linear_token_logprobs" in impls("triton")) == ("linear_token_logprobs" in rk.OPS)
    hidden, weight, bias, labels = make(12, 16, 50, torch.float32, seed=13)
    h3, l2 = hidden.view(3, 4, 16), labels.view(3, 4)
    lp, ent, mean, top1 = lin.linear_token_logprobs(h3, weight, l2, bias, 1.5, 4.0, 0.8, IGNORE, True, False, True)
    assert mean is None and lp.shape == ent.shape == top1.shape == (3, 4)
    lp64, ent64, _, top164 = truth(hidden, weight, bias, labels, 1.5, 4.0, 0.8)
    assert_close(lp.reshape(-1), lp64, "entry logprobs", scale=1 + float(lp64.abs().max()))
    assert_close(ent.reshape(-1), ent64, "entry entropy", scale=1 + float(ent64.abs().max()))
    assert torch.equal(top1.reshape(-1), top164)
    lp_only = lin.linear_token_logprobs(h3, weight, l2, None, 1.0, 0.0, 1.0, IGNORE, False, False, False)
    assert lp_only[1:] == (None, None, None)
    assert_close(lp_only[0].reshape(-1), truth(hidden, weight, None, labels, 1.0, 0.0, 1.0)[0], "entry no bias")
