"""linear_token_logprobs: values and the hidden / weight / bias gradients of every backend against
float64 truth computed the unfused way (materialised logits), plus the guarantees of the docstring:
ignored rows never projected, first-index argmax, bf16/fp16 accumulation, memory, determinism,
torch.compile and opcheck."""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlhf_kernels as rk

from .utils import DEVICE, DTYPES, TOL, Tol, assert_all_finite, assert_close, require

OP = "linear_token_logprobs"
IGNORE = -100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# float64 truth, from the docstring's formula on the full [N, V] logits


def truth(hidden, weight, bias, labels, *, logit_scale=1.0, softcap=None, temperature=1.0, ignore_index=IGNORE):
    """(logprob, entropy, mean_logit, is_top1) in float64 with autograd, the unfused way."""
    y = hidden @ weight.T
    if bias is not None:
        y = y + bias
    z = logit_scale * y
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    ent = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
    zero = torch.zeros((), dtype=z.dtype)
    mean = z.mean(-1).detach()
    top1 = (z.argmax(-1) == labels) & valid
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero), torch.where(valid, mean, zero), top1


def make_case(lead, H, V, dtype, *, bias=True, ignore_frac=0.25, seed=0, logit_std=3.0):
    """hidden [*lead, H], weight [V, H], bias [V] or None, labels [*lead]: values rounded to dtype
    first, so the float64 truth sees exactly the kernel's inputs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * logit_std / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    drop = torch.rand(lead, generator=g) < ignore_frac
    labels = torch.where(drop, torch.full_like(labels, IGNORE), labels)
    return hidden, weight, b, labels


def _amax(t) -> float:
    """max |t| (0 for an empty tensor)."""
    t = t.detach()
    return float(t.abs().max()) if t.numel() else 0.0


def _leaves(*ts, dtype=None, device=DEVICE):
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        x = t.detach().clone()
        x = x.to(dtype) if dtype is not None else x
        out.append(x.to(device).requires_grad_(True))
    return out


def _unfused_error(hidden, weight, bias, labels, kw, g_lp, g_ent):
    """Error against float64 of the unfused PyTorch computation in the inputs' dtype (logits in that
    dtype, then fp32 log-softmax): the yardstick for bf16/fp16."""
    h, w, b = _leaves(hidden, weight, bias, device="cpu")
    y = h @ w.T + (b if b is not None else 0)
    lp, ent, _, _ = truth_fp32_from_logits(y, labels, **kw)
    ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
    return lp, ent, h.grad, w.grad, (b.grad if b is not None else None)


def truth_fp32_from_logits(y, labels, logit_scale=1.0, softcap=None, temperature=1.0, ignore_index=IGNORE):
    z = y.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, -1)
    valid = labels != ignore_index
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0), None, None


def run_and_check(backend, hidden, weight, bias, labels, *, name, return_entropy=True, check_extras=True, **kw):
    """Run the op with every output, compare values and the three gradients (random upstream
    gradients on logprobs and entropy) with float64 truth; returns the outputs."""
    dtype = hidden.dtype
    h, w, b = _leaves(hidden, weight, bias)
    lab = labels.to(DEVICE)
    before = [t.detach().clone() for t in (h, w) + ((b,) if b is not None else ())]
    out = rk.linear_token_logprobs(h, w, lab, bias=b, return_entropy=return_entropy, return_mean_logit=check_extras,
                                   return_is_top1=check_extras, backend=backend, **kw)
    out = out if isinstance(out, tuple) else (out,)
    lp = out[0]
    ent = out[1] if return_entropy else None
    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64, device="cpu")
    lp64, ent64, mean64, top64 = truth(h64, w64, b64, labels, **kw)
    assert lp.dtype == torch.float32 and lp.shape == labels.shape, (lp.dtype, lp.shape)
    scale = max(1.0, _amax(lp64))
    assert_close(lp, lp64, f"{name} logprobs", TOL[torch.float32], scale=scale)
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    g_ent = torch.randn(labels.shape, generator=g, dtype=torch.float64) if return_entropy else torch.zeros(labels.shape, dtype=torch.float64)
    if return_entropy:
        assert ent.dtype == torch.float32 and ent.shape == labels.shape
        assert_close(ent, ent64, f"{name} entropy", TOL[torch.float32], scale=max(1.0, _amax(ent64)))
    if check_extras:
        mean, top1 = out[-2], out[-1]
        assert mean.dtype == torch.float32 and top1.dtype == torch.bool
        assert_close(mean, mean64, f"{name} mean_logit", TOL[torch.float32], scale=max(1.0, _amax(mean64)))
        assert torch.equal(top1.cpu(), top64), f"{name} is_top1: {top1.cpu().tolist()} != {top64.tolist()}"
    loss = (lp.double().cpu() * g_lp).sum()
    loss64 = (lp64 * g_lp).sum()
    if return_entropy:
        loss = loss + (ent.double().cpu() * g_ent).sum()
        loss64 = loss64 + (ent64 * g_ent).sum()
    loss.backward()
    loss64.backward()
    pairs = [("hidden", h, h64), ("weight", w, w64)] + ([("bias", b, b64)] if b is not None else [])
    if dtype == torch.float32:
        for pname, x, x64 in pairs:
            assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape, pname
            big = _amax(x64.grad)
            assert_close(x.grad, x64.grad, f"{name} d/d{pname}", TOL[torch.float32], scale=max(1.0, big))
    else:
        # bf16/fp16: within a small multiple of the unfused PyTorch computation's own error at this
        # dtype (logits rounded to the dtype, as `hidden @ weight.T` gives them), plus a floor.
        u_lp, u_ent, *u_grads = _unfused_error(hidden, weight, bias, labels, kw, g_lp, g_ent)
        checks = [("logprobs", lp, lp64, u_lp)]
        if return_entropy:
            checks.append(("entropy", ent, ent64, u_ent))
        for (pname, x, x64), ug in zip(pairs, u_grads):
            assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape, pname
            checks.append((f"d/d{pname}", x.grad, x64.grad, ug))
        for what, actual, t64, unfused in checks:
            t64 = t64.detach()
            err = (actual.detach().double().cpu() - t64).abs().max().item()
            own = (unfused.detach().double() - t64).abs().max().item()
            ulp = (t64.to(dtype).double() - t64).abs().max().item()  # rounding the truth itself
            floor = 1e-5 * max(1.0, t64.abs().max().item())
            assert err <= 2.0 * max(own, ulp) + floor, (
                f"{name} {what}: max error {err:.3g} > 2 x the unfused {dtype} computation's {own:.3g} "
                f"(rounding {ulp:.3g})")
    # Ignored positions: exact zeros, no gradient to their hidden rows; inputs never written.
    ignored = (labels == IGNORE).cpu()
    assert bool((lp.detach().cpu()[ignored] == 0).all())
    assert bool((h.grad.cpu()[ignored] == 0).all()), f"{name}: gradient leaked into ignored rows"
    for t, t0 in zip((h, w) + ((b,) if b is not None else ()), before):
        assert torch.equal(t.detach(), t0), f"{name}: an input was modified in place"
    return out


# (lead shape, H, V, bias, logit_scale, softcap, temperature)
CASES = [
    pytest.param((2, 5), 16, 37, True, 1.0, None, 1.0, id="plain"),
    pytest.param((7,), 32, 130, False, 1.0, None, 0.7, id="nobias-T0.7"),
    pytest.param((3, 4), 24, 67, True, 0.5, 2.5, 1.3, id="scale-softcap-T"),
    pytest.param((9,), 8, 1, True, -0.75, 4.0, 1.0, id="V1-negscale"),
    pytest.param((1,), 12, 29, True, 2.0, 30.0, 0.9, id="one-row"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,H,V,bias,logit_scale,softcap,temperature", CASES)
def test_values_and_grads(backend, dtype, lead, H, V, bias, logit_scale, softcap, temperature):
    require(backend, OP, dtype)
    hidden, weight, b, labels = make_case(lead, H, V, dtype, bias=bias)
    run_and_check(backend, hidden, weight, b, labels, name=f"{backend}/{dtype}", logit_scale=logit_scale,
                  softcap=softcap, temperature=temperature)


@pytest.mark.parametrize("return_entropy", [False, True], ids=["lp", "lp+ent"])
def test_logprob_only_gradients(backend, return_entropy):
    """Without return_entropy the only upstream gradient is the log-prob's."""
    require(backend, OP)
    hidden, weight, b, labels = make_case((4, 3), 20, 45, torch.float32, seed=2)
    run_and_check(backend, hidden, weight, b, labels, name=backend, return_entropy=return_entropy,
                  check_extras=False, softcap=5.0, temperature=0.8)


def test_entropy_only_gradient(backend):
    require(backend, OP)
    hidden, weight, b, labels = make_case((6,), 16, 40, torch.float32, seed=4)
    h, w, bb = _leaves(hidden, weight, b)
    _, ent = rk.linear_token_logprobs(h, w, labels.to(DEVICE), bias=bb, return_entropy=True, backend=backend)
    ent.sum().backward()
    h64, w64, b64 = _leaves(hidden, weight, b, dtype=torch.float64, device="cpu")
    _, ent64, _, _ = truth(h64, w64, b64, labels)
    ent64.sum().backward()
    for name, x, x64 in (("hidden", h, h64), ("weight", w, w64), ("bias", bb, b64)):
        assert_close(x.grad, x64.grad, f"d entropy/d{name}", scale=max(1.0, _amax(x64.grad)))


def _small_tiles(monkeypatch, backend, V):
    """The reference's tile shape is a module attribute: shrink it so that these inputs cross several
    tiles with ragged last ones (7 x 16 for small V, 100 x 1000 at V = 4500)."""
    if backend == "reference":
        from rlhf_kernels.reference import linear_logprobs as ref

        monkeypatch.setattr(ref, "TOKEN_CHUNK", 7 if V < 1000 else 100)
        monkeypatch.setattr(ref, "VOCAB_CHUNK", 16 if V < 1000 else 1000)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tiles_ragged_edges(backend, dtype, monkeypatch):
    """N and V not multiples of any tile (the cpu backend's tiles: 4096 vocabulary entries and 256
    rows at this V), so the last row tile and the last vocabulary tile are partial."""
    require(backend, OP, dtype)
    n, vocab = 331, 4500
    if backend == "triton" and DEVICE == "cpu":
        # The interpreter's tiles (16 rows x 32 columns, backward chunks of 64 columns) are crossed
        # raggedly by far smaller inputs; the full size takes many minutes there.
        n, vocab = 45, 301
    _small_tiles(monkeypatch, backend, vocab)
    hidden, weight, b, labels = make_case((n,), 16, vocab, dtype, seed=5, ignore_frac=0.1)
    run_and_check(backend, hidden, weight, b, labels, name=f"{backend}/{dtype}", softcap=6.0,
                  temperature=0.9, logit_scale=1.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_spanning_several_large_tiles(backend, dtype):
    """V = 20000 is three vocabulary tiles of the cuda backend (up to 8192 entries each), the last one
    partial, and five of the cpu backend's: the per-row state carried across tiles, at full tile sizes."""
    require(backend, OP, dtype)
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("minutes under the Triton interpreter; test_many_tiles_ragged_edges crosses its tiles")
    hidden, weight, b, labels = make_case((300,), 64, 20000, dtype, seed=8, ignore_frac=0.2)
    run_and_check(backend, hidden, weight, b, labels, name=f"{backend}/{dtype}", softcap=8.0, temperature=0.9)


# ------------------------------------------------------------------------------------------------
# ignored rows


def test_all_rows_ignored(backend):
    require(backend, OP)
    hidden, weight, b, _ = make_case((3, 4), 8, 21, torch.float32)
    labels = torch.full((3, 4), IGNORE)
    h, w, bb = _leaves(hidden, weight, b)
    lp, ent, mean, top1 = rk.linear_token_logprobs(h, w, labels, bias=bb, return_entropy=True,
                                                   return_mean_logit=True, return_is_top1=True, backend=backend)
    for t in (lp, ent, mean):
        assert t.shape == (3, 4) and t.dtype == torch.float32 and bool((t == 0).all())
    assert top1.dtype == torch.bool and not bool(top1.any())
    (lp.sum() + ent.sum()).backward()
    for x in (h, w, bb):
        assert x.grad is None or bool((x.grad == 0).all())


def test_no_row_ignored(backend):
    require(backend, OP)
    hidden, weight, b, labels = make_case((2, 6), 12, 33, torch.float32, ignore_frac=0.0, seed=7)
    assert bool((labels != IGNORE).all())
    run_and_check(backend, hidden, weight, b, labels, name=backend)


def test_ignored_rows_are_never_read(backend):
    """NaN / inf hidden states at ignored positions (and NaN upstream gradients there) leak into
    nothing: those rows are not projected."""
    require(backend, OP)
    hidden, weight, b, labels = make_case((5, 4), 12, 29, torch.float32, seed=8)
    labels[0, :] = IGNORE
    labels[3, 1] = IGNORE
    hidden[0, :, :] = float("nan")
    hidden[3, 1, 0] = float("inf")
    h, w, bb = _leaves(hidden, weight, b)
    lp, ent = rk.linear_token_logprobs(h, w, labels, bias=bb, return_entropy=True, backend=backend)
    assert_all_finite(lp, "logprobs")
    assert_all_finite(ent, "entropy")
    g = torch.randn(5, 4)
    g[0, :] = float("nan")
    torch.autograd.backward([lp, ent], [g, torch.ones(5, 4)])
    for name, x in (("hidden", h), ("weight", w), ("bias", bb)):
        assert_all_finite(x.grad, f"d/d{name}")
    assert bool((h.grad[labels == IGNORE] == 0).all())


def test_custom_ignore_index_and_int32_labels(backend):
    require(backend, OP)
    hidden, weight, b, labels = make_case((4, 3), 10, 25, torch.float32, seed=9)
    labels = torch.where(labels == IGNORE, torch.full_like(labels, 7), labels)  # 7 is now ignored
    h, w, bb = _leaves(hidden, weight, b)
    lp = rk.linear_token_logprobs(h, w, labels.int(), bias=bb, ignore_index=7, backend=backend)
    h64, w64, b64 = _leaves(hidden, weight, b, dtype=torch.float64, device="cpu")
    lp64, _, _, _ = truth(h64, w64, b64, labels, ignore_index=7)
    assert_close(lp, lp64, "logprobs", scale=_amax(lp64))


# ------------------------------------------------------------------------------------------------
# is_top1: first index wins a tie


def _tie_case(V, i, j, n=6, H=8, softcap=None):
    """Rows i and j of the head are zero and their bias is the largest, equal: z_i == z_j exactly
    (whatever the GEMM's summation order) and both are the argmax."""
    hidden, weight, b, _ = make_case((n,), H, V, torch.float32, seed=11, logit_std=0.1)
    weight[i] = 0.0
    weight[j] = 0.0
    b = b * 0.1
    b[i] = b[j] = 5.0
    labels = torch.tensor([i, j] * (n // 2))
    return hidden, weight, b, labels


@pytest.mark.parametrize("V,i,j", [(67, 3, 50), (67, 0, 66), (4500, 5, 4400), (20000, 5, 8200)],
                         ids=["same-or-near", "ends", "across-4096", "across-8192"])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_is_top1_first_index_wins_ties(backend, V, i, j, softcap, monkeypatch):
    require(backend, OP)
    if V > 4500 and backend == "triton" and DEVICE == "cpu":
        pytest.skip("V = 20000 is minutes under the Triton interpreter; 'across-4096' crosses its tiles")
    _small_tiles(monkeypatch, backend, V)
    hidden, weight, b, labels = _tie_case(V, i, j)
    _, top1 = rk.linear_token_logprobs(hidden, weight, labels, bias=b, softcap=softcap, return_is_top1=True,
                                       backend=backend)
    expected = torch.tensor([True, False] * 3)
    assert torch.equal(top1.cpu(), expected), top1
    # torch.argmax agrees (the definition).
    z = hidden.double() @ weight.double().T + b.double()
    assert torch.equal(z.argmax(-1) == labels, expected)


def test_is_top1_later_strictly_larger_wins(backend, monkeypatch):
    require(backend, OP)
    _small_tiles(monkeypatch, backend, 4500)
    hidden, weight, b, labels = _tie_case(4500, 5, 4400)
    b[4400] = 5.5  # now strictly larger, in a later tile
    _, top1 = rk.linear_token_logprobs(hidden, weight, labels, bias=b, return_is_top1=True, backend=backend)
    assert torch.equal(top1.cpu(), torch.tensor([False, True] * 3)), top1


# ------------------------------------------------------------------------------------------------
# the optional outputs


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)),
                         ids=lambda f: "".join("EMT"[k] if v else "-" for k, v in enumerate(f)))
def test_outputs_in_every_combination(backend, flags):
    """The tuple holds logprobs, then only the requested ones, in the order entropy, mean_logit,
    is_top1; a bare tensor when none is requested."""
    require(backend, OP)
    want_ent, want_mean, want_top = flags
    hidden, weight, b, labels = make_case((3, 5), 16, 41, torch.float32, seed=12)
    full = rk.linear_token_logprobs(hidden, weight, labels, bias=b, return_entropy=True, return_mean_logit=True,
                                    return_is_top1=True, backend=backend)
    out = rk.linear_token_logprobs(hidden, weight, labels, bias=b, return_entropy=want_ent,
                                   return_mean_logit=want_mean, return_is_top1=want_top, backend=backend)
    if not any(flags):
        assert isinstance(out, torch.Tensor)
        out = (out,)
    assert isinstance(out, tuple) and len(out) == 1 + sum(flags)
    expected = [full[0]] + [t for t, want in zip(full[1:], flags) if want]
    for got, exp in zip(out, expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        assert torch.equal(got, exp)
    h64, w64, b64 = _leaves(hidden, weight, b, dtype=torch.float64, device="cpu")
    t64 = truth(h64, w64, b64, labels)
    for got, exp in zip(full, t64):
        if got.dtype == torch.bool:
            assert torch.equal(got.cpu(), exp)
        else:
            assert_close(got, exp.detach(), "output", scale=max(1.0, _amax(exp)))


# ------------------------------------------------------------------------------------------------
# equal to token_logprobs on the explicit logits; tied embeddings


@pytest.mark.parametrize("softcap,logit_scale", [(None, 1.0), (3.0, 0.8)])
def test_equals_token_logprobs_on_explicit_logits(backend, softcap, logit_scale):
    require(backend, OP)
    require(backend, "token_logprobs")
    hidden, weight, b, labels = make_case((4, 6), 24, 53, torch.float32, seed=13)
    T = 0.85
    lp, ent = rk.linear_token_logprobs(hidden, weight, labels, bias=b, temperature=T, return_entropy=True,
                                       logit_scale=logit_scale, softcap=softcap, backend=backend)
    y = (hidden.double() @ weight.double().T + b.double()) * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    lp2, ent2 = rk.token_logprobs(y.float(), labels, temperature=T, return_entropy=True, backend=backend)
    assert_close(lp, lp2, "logprobs vs token_logprobs", Tol(3e-5, 3e-5), scale=_amax(lp2))
    assert_close(ent, ent2, "entropy vs token_logprobs", Tol(3e-5, 3e-5), scale=_amax(ent2))


def test_tied_embedding_head_gradient_is_summed(backend):
    """A tiny LM whose head is its input embedding: the embedding's gradient is the sum of the
    lookup's and the head's, as with materialised logits."""
    require(backend, OP)
    V, H, B, T = 37, 16, 3, 7
    g = torch.Generator().manual_seed(14)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE
    mix0 = torch.randn(H, H, generator=g, dtype=torch.float64) / H ** 0.5

    def run(dtype, fused):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(V, H).to(dtype)
        mix = torch.nn.Parameter(mix0.to(dtype))
        hidden = torch.tanh(emb(ids) @ mix)
        if fused:
            lp = rk.linear_token_logprobs(hidden, emb.weight, labels, temperature=0.9, backend=backend)
        else:
            lp, _, _, _ = truth(hidden, emb.weight, None, labels, temperature=0.9)
        (lp * (labels != IGNORE)).sum().backward()
        return lp, emb.weight.grad, mix.grad

    lp, g_emb, g_mix = run(torch.float32, True)
    lp64, g_emb64, g_mix64 = run(torch.float64, False)
    assert_close(lp, lp64.detach(), "logprobs", scale=_amax(lp64))
    assert_close(g_emb, g_emb64, "d/d embedding (lookup + head)", scale=_amax(g_emb64))
    assert_close(g_mix, g_mix64, "d/d mix", scale=_amax(g_mix64))


def test_tied_hf_model(backend):
    """A tiny Llama with tie_word_embeddings=True: log-probs and every parameter's gradient from
    the final hidden states and get_output_embeddings() equal those through model(...).logits."""
    require(backend, OP)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 53, (2, 9))
    labels = ids[:, 1:].clone()
    labels[0, :3] = IGNORE

    model.zero_grad()
    logits = model(ids).logits[:, :-1]
    lp_ref, _, _, _ = truth_from_logits64(logits, labels)
    lp_ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    fmodel = model.float()
    hidden = fmodel.model(ids).last_hidden_state[:, :-1]
    lp = rk.linear_token_logprobs(hidden, fmodel.get_output_embeddings().weight, labels, backend=backend)
    lp.sum().backward()
    assert_close(lp, lp_ref.detach(), "logprobs", Tol(1e-4, 1e-4), scale=_amax(lp_ref))
    for n, p in fmodel.named_parameters():
        assert_close(p.grad, ref_grads[n], f"d/d{n}", Tol(1e-4, 1e-3), scale=_amax(ref_grads[n]))


def truth_from_logits64(logits, labels):
    z = logits
    logp = torch.log_softmax(z, -1)
    valid = labels != IGNORE
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lp, 0.0), None, None, None


# ------------------------------------------------------------------------------------------------
# layouts, empty input, determinism


def test_non_contiguous_inputs(backend):
    require(backend, OP)
    hidden, weight, b, labels = make_case((4, 5), 12, 31, torch.float32, seed=15)
    h_nc = torch.stack([hidden, hidden], dim=-1)[..., 0]  # strided hidden (stride 2 on H)
    w_nc = weight.t().contiguous().t()  # column-major head
    lab_nc = torch.stack([labels, labels], dim=-1)[..., 0]
    assert not h_nc.is_contiguous() and w_nc.stride(-1) != 1 and not lab_nc.is_contiguous()
    h, w = h_nc.clone().requires_grad_(True), w_nc.clone().requires_grad_(True)  # clone keeps strides
    lp = rk.linear_token_logprobs(h, w, lab_nc, bias=b, backend=backend)
    h64, w64, _ = _leaves(hidden, weight, None, dtype=torch.float64, device="cpu")
    lp64, _, _, _ = truth(h64, w64, b.double(), labels)
    assert_close(lp, lp64, "logprobs", scale=_amax(lp64))
    lp.sum().backward()
    lp64.sum().backward()
    assert_close(h.grad, h64.grad, "d/dhidden", scale=_amax(h64.grad))
    assert_close(w.grad, w64.grad, "d/dweight", scale=_amax(w64.grad))


def test_empty_input(backend):
    require(backend, OP)
    h = torch.zeros(0, 3, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    lp, ent = rk.linear_token_logprobs(h, w, torch.zeros(0, 3, dtype=torch.long), return_entropy=True, backend=backend)
    assert lp.shape == (0, 3) and ent.shape == (0, 3)
    (lp.sum() + ent.sum()).backward()
    assert w.grad is None or bool((w.grad == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(backend, dtype):
    """The same bits run to run, gradients included."""
    require(backend, OP, dtype)
    n, vocab = 300, 4500
    if backend == "triton" and DEVICE == "cpu":
        n, vocab = 40, 301  # still several of the interpreter's tiles; the full size takes minutes there
    hidden, weight, b, labels = make_case((n,), 32, vocab, dtype, seed=16, ignore_frac=0.2)

    def once():
        h, w, bb = _leaves(hidden, weight, b)
        lp, ent, mean = rk.linear_token_logprobs(h, w, labels.to(DEVICE), bias=bb, return_entropy=True,
                                                 return_mean_logit=True, softcap=8.0, backend=backend)
        (lp.sum() + 0.3 * ent.sum()).backward()
        return [lp, ent, mean, h.grad, w.grad, bb.grad]

    a, c = once(), once()
    for name, x, y in zip(("logprobs", "entropy", "mean_logit", "d/dhidden", "d/dweight", "d/dbias"), a, c):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


# ------------------------------------------------------------------------------------------------
# bad input: each error names the argument


def _ok():
    hidden, weight, b, labels = make_case((2, 3), 8, 13, torch.float32)
    return {"hidden": hidden, "weight": weight, "labels": labels, "bias": b}


BAD = [
    ("hidden not a tensor", {"hidden": [[1.0]]}, TypeError, "hidden"),
    ("hidden int", {"hidden": torch.zeros(2, 3, 8, dtype=torch.long)}, TypeError, "hidden"),
    ("hidden 0-d", {"hidden": torch.tensor(1.0), "labels": torch.tensor(1)}, ValueError, "hidden"),
    ("weight 1-D", {"weight": torch.zeros(8)}, ValueError, "weight"),
    ("weight wrong H", {"weight": torch.zeros(13, 9)}, ValueError, "weight"),
    ("weight dtype", {"weight": torch.zeros(13, 8, dtype=torch.bfloat16)}, TypeError, "weight"),
    ("weight not a tensor", {"weight": None}, TypeError, "weight"),
    ("bias shape", {"bias": torch.zeros(12)}, ValueError, "bias"),
    ("bias dtype", {"bias": torch.zeros(13, dtype=torch.float16)}, TypeError, "bias"),
    ("bias not a tensor", {"bias": 3.0}, TypeError, "bias"),
    ("labels float", {"labels": torch.zeros(2, 3)}, TypeError, "labels"),
    ("labels shape", {"labels": torch.zeros(2, 4, dtype=torch.long)}, ValueError, "labels"),
    ("labels out of range", {"labels": torch.tensor([[0, 13, 1], [2, 3, 4]])}, ValueError, "labels"),
    ("labels negative", {"labels": torch.tensor([[0, -1, 1], [2, 3, 4]])}, ValueError, "labels"),
    ("temperature 0", {"temperature": 0.0}, ValueError, "temperature"),
    ("temperature tiny", {"temperature": 1e-40}, ValueError, "temperature"),
    ("temperature str", {"temperature": "1"}, TypeError, "temperature"),
    ("logit_scale 0", {"logit_scale": 0.0}, ValueError, "logit_scale"),
    ("logit_scale inf", {"logit_scale": float("inf")}, ValueError, "logit_scale"),
    ("logit_scale nan", {"logit_scale": float("nan")}, ValueError, "logit_scale"),
    ("logit_scale None", {"logit_scale": None}, TypeError, "logit_scale"),
    ("softcap 0", {"softcap": 0.0}, ValueError, "softcap"),
    ("softcap negative", {"softcap": -1.0}, ValueError, "softcap"),
    ("softcap inf", {"softcap": float("inf")}, ValueError, "softcap"),
    ("softcap bool", {"softcap": True}, TypeError, "softcap"),
    ("ignore_index float", {"ignore_index": -100.0}, TypeError, "ignore_index"),
    ("return_entropy int", {"return_entropy": 1}, TypeError, "return_entropy"),
    ("return_mean_logit str", {"return_mean_logit": "yes"}, TypeError, "return_mean_logit"),
    ("return_is_top1 None", {"return_is_top1": None}, TypeError, "return_is_top1"),
    ("backend unknown", {"backend": "gpu"}, ValueError, "backend"),
    ("empty vocabulary", {"weight": torch.zeros(0, 8), "bias": None}, ValueError, "weight"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(case):
    _, change, exc, name = case
    kw = _ok()
    kw.update(change)
    args = [kw.pop("hidden"), kw.pop("weight"), kw.pop("labels")]
    with pytest.raises(exc, match=name):
        rk.linear_token_logprobs(*args, **kw)


def test_device_mismatch_names_the_argument():
    kw = _ok()
    with pytest.raises(ValueError, match="weight"):
        rk.linear_token_logprobs(kw["hidden"], kw["weight"].to("meta"), kw["labels"], bias=kw["bias"])
    with pytest.raises(ValueError, match="bias"):
        rk.linear_token_logprobs(kw["hidden"], kw["weight"], kw["labels"], bias=kw["bias"].to("meta"))


def test_op_rejects_out_of_range_labels():
    """Called directly (bypassing the public API's checks), the compiled op refuses bad labels
    instead of reading out of bounds."""
    require("cpu", OP)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.rlhf_kernels.linear_token_logprobs_fwd(torch.randn(2, 4), torch.randn(5, 4), None,
                                                         torch.tensor([1, 7]), 1.0, 0.0, 1.0, -100, False, False)


# ------------------------------------------------------------------------------------------------
# torch.compile and the registered ops


_COMPILED = ["cpu", "triton", "cuda"]


@pytest.mark.parametrize("compiled_backend", _COMPILED)
@pytest.mark.parametrize("with_bias", [True, False])
def test_compile_fullgraph(compiled_backend, with_bias):
    """torch.compile(fullgraph=True) traces a function calling the op (no graph break), forward
    and backward, and gives the eager results."""
    require(compiled_backend, OP)
    torch._dynamo.reset()
    hidden, weight, b, labels = make_case((3, 5), 16, 45, torch.float32, bias=with_bias, seed=17)

    def f(h, w, bb, lab):
        lp, ent, mean, top1 = rk.linear_token_logprobs(h, w, lab, bias=bb, temperature=0.8, softcap=4.0,
                                                       return_entropy=True, return_mean_logit=True,
                                                       return_is_top1=True, backend=compiled_backend)
        return (lp.sum() + 0.5 * ent.sum(), mean, top1)

    def run(fn):
        h, w, bb = _leaves(hidden, weight, b)
        loss, mean, top1 = fn(h, w, bb, labels.to(DEVICE))
        loss.backward()
        return [loss, mean, top1, h.grad, w.grad] + ([bb.grad] if with_bias else [])

    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True, backend="aot_eager"))
    for name, x, y in zip(("loss", "mean", "top1", "d/dh", "d/dw", "d/db"), compiled, eager):
        if x.dtype == torch.bool:
            assert torch.equal(x, y), name
        else:
            assert_close(x, y, name, Tol(1e-6, 1e-6), scale=max(1.0, _amax(y)))


def _opcheck_args(dtype=torch.float32, bias=True, softcap=0.0, with_entropy=True, with_extras=True, device=DEVICE):
    hidden, weight, b, labels = make_case((7,), 16, 45, dtype, bias=bias, seed=18)
    hidden, weight = hidden.to(device).requires_grad_(), weight.to(device).requires_grad_()
    b = b.to(device).requires_grad_() if bias else None
    return (hidden, weight, b, labels.to(device), 0.9, softcap, 1.1, IGNORE, with_entropy, with_extras)


_OPCHECK = [
    {},
    {"bias": False, "with_extras": False},
    {"softcap": 3.0, "with_entropy": False},
    {"dtype": torch.bfloat16},
]


@pytest.mark.parametrize("namespace", ["rlhf_kernels", "rlhf_kernels_triton"])
@pytest.mark.parametrize("case", range(len(_OPCHECK)))
def test_opcheck(namespace, case):
    """Schema, fake implementation against the real output, autograd registration, AOT dispatch."""
    require("cpu" if namespace == "rlhf_kernels" else "triton", OP)
    op = getattr(torch.ops, namespace).linear_token_logprobs_fwd
    torch.library.opcheck(op, _opcheck_args(**_OPCHECK[case]))


@pytest.mark.parametrize("namespace", ["rlhf_kernels", "rlhf_kernels_triton"])
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
def test_opcheck_backward_op(namespace, mask):
    require("cpu" if namespace == "rlhf_kernels" else "triton", OP)
    ops = getattr(torch.ops, namespace)
    hidden, weight, b, labels, *_ = _opcheck_args()
    hidden, weight, b = hidden.detach(), weight.detach(), b.detach()
    lp, lse, ent, _, _ = ops.linear_token_logprobs_fwd(hidden, weight, b, labels, 0.9, 0.0, 1.1, IGNORE, True, False)
    g = torch.randn_like(lp)
    torch.library.opcheck(ops.linear_token_logprobs_bwd,
                          (g, torch.randn_like(lp), hidden, weight, b, labels, lse, ent, 0.9, 0.0, 1.1, IGNORE, list(mask)))


# ------------------------------------------------------------------------------------------------
# memory: the [N, V] logits never exist

_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import rlhf_kernels as rk
    mode, backend = sys.argv[1], sys.argv[2]
    N, H, V = 2048, 64, 32000
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)

    def step(n):
        h, lab = hidden[:n], labels[:n]
        if mode == "fused":
            lp, ent = rk.linear_token_logprobs(h, weight, lab, return_entropy=True, backend=backend)
        else:  # the unfused computation, for comparison
            logp = torch.log_softmax(h @ weight.T, -1)
            lp = logp.gather(-1, lab[:, None]).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
        (lp.sum() + ent.sum()).backward()
        hidden.grad = None
        weight.grad = None

    def status_kb(key):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1])

    step(16)  # warm up: libraries, thread pools, the weight gradient's size class
    torch.zeros(V, H).add_(1)  # touch one weight-gradient-sized buffer, as a step allocates it
    try:  # reset the high-water mark to the current resident set (Linux), so an earlier peak
        with open("/proc/self/clear_refs", "w") as f:  # (imports, warm-up) cannot hide this one
            f.write("5")
        before = status_kb("VmRSS:")
        step(N)
        after = status_kb("VmHWM:")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(N)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("PEAK_EXTRA_BYTES", (after - before) * 1024)
""")


def _peak_extra(mode, backend):
    # A fixed mmap threshold makes glibc hand every large block straight back to the system when it is
    # freed, so the resident high-water mark measures live tensors rather than what the allocator keeps.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode, backend], check=False, capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("PEAK_EXTRA_BYTES")][-1]
    return int(line.split()[1])


@pytest.mark.parametrize("mem_backend", ["cpu", "reference"])
def test_peak_memory_is_far_below_the_logits(mem_backend):
    """Forward + backward at N=2048, H=64, V=32000: the process's peak resident memory grows by far
    less than one fp32 [N, V] tensor (262 MB), while the unfused computation (measured the same
    way, so the method can see it) grows by more than that."""
    if DEVICE != "cpu":
        pytest.skip("measures the CPU process's resident memory")
    require(mem_backend, OP)
    nv_bytes = 2048 * 32000 * 4
    fused = _peak_extra("fused", mem_backend)
    unfused = _peak_extra("unfused", mem_backend)
    assert unfused > nv_bytes, f"the measurement missed the unfused logits: {unfused / 1e6:.0f} MB"
    assert fused < 0.15 * nv_bytes, (
        f"{mem_backend}: peak extra memory {fused / 1e6:.1f} MB is not far below the {nv_bytes / 1e6:.0f} MB "
        f"of the [N, V] logits (unfused: {unfused / 1e6:.0f} MB)")
