"""The TRL adapter against TRL's own functions, and TRL's DPO and GRPO trainers with and without it.

Skipped with the reason when TRL does not import.  Every comparison is with TRL's own code captured
before ``apply()``: its chunked LM-head function (values of the five outputs and gradients), its
``add_fused_lm_head`` forward on a tiny Llama (padding, prompt labels, temperature, soft-cap, logit
scale), its log-softmax helpers (row masks, temperature, bf16), and two training runs of each trainer
from the same seed.  Tolerances: float32 results of the same formula summed in a different order
(our tiles vs TRL's chunks) agree to ~1e-7; we allow rtol 1e-5 / atol 1e-6 for values and 1e-5 for
gradients (an error of the kind the adapter could make, a missed temperature, soft-cap, scale or
mask, is >= 1e-3 on these inputs).
"""

import functools
import importlib
import inspect
import sys
import types

import pytest
import torch

import rlhf_kernels as rk

try:
    trl = importlib.import_module("trl")
    trl_utils = importlib.import_module("trl.trainer.utils")
    transformers = importlib.import_module("transformers")
    datasets = importlib.import_module("datasets")
except Exception as exc:  # noqa: BLE001 - any import failure of the peer means skip
    pytest.skip(f"TRL is not importable here ({type(exc).__name__}: {exc}); pip install '.[trl]'",
                allow_module_level=True)

from rlhf_kernels.integrations import trl as rk_trl

# TRL's own objects, captured before any apply()
TRL_CHUNKED = getattr(trl_utils, "_ChunkedLogProbFunction", None)
TRL_FNS = {name: getattr(trl_utils, name) for name in rk_trl._LOGITS_FUNCTIONS if hasattr(trl_utils, name)}
HAS_FUSED_HEAD = hasattr(trl_utils, "add_fused_lm_head")  # TRL 1.15+
TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _always_undo():
    rk_trl.undo()
    yield
    rk_trl.undo()


def _chunked_outputs(fn, *args):
    """Call a chunked function the way TRL 1.15+ does, or the 1.1-1.14 way (2 outputs)."""
    out = fn.apply(*args)
    return tuple(out) + (None,) * (5 - len(out))


def _chunked_args(hidden, weight, bias, targets, temperature, softcap, scale, outputs):
    names = list(inspect.signature(TRL_CHUNKED.forward).parameters)[1:]
    values = {"hidden": hidden, "last_hidden": hidden, "weight": weight, "bias": bias, "targets": targets,
              "temperature": temperature, "chunk_size": 32768, "final_logit_softcapping": softcap,
              "logit_scale": scale, "outputs": outputs}
    return [values[n] for n in names]


# ----------------------------------------------------------------------------- the chunked LM head


@pytest.mark.skipif(TRL_CHUNKED is None, reason="this TRL has no chunked LM-head function (TRL < 1.1)")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature,softcap,scale", [(1.0, None, 1.0), (0.7, 2.0, 1.3), (1.6, None, 0.5)])
@pytest.mark.parametrize("outputs", [rk_trl.FUSED_OUTPUTS, ("log_probs",), ("log_probs", "entropy", "is_top1")])
def test_chunked_head_equals_trls(bias, temperature, softcap, scale, outputs):
    g = torch.Generator().manual_seed(7)
    n, h, v = 23, 16, 50
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.8
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    # rows 0 and 1: logits 2, 3, 4 tie for the max; row 0's target is the first of them (top-1, as
    # argmax), row 1's the last (not top-1)
    weight[3], weight[4] = weight[2].clone(), weight[2].clone()
    hidden[0], hidden[1] = weight[2], weight[2]
    targets[0], targets[1] = 2, 4
    if b is not None:
        b[2:5] = b[2]
    if b is not None and "bias" not in inspect.signature(TRL_CHUNKED.forward).parameters:
        pytest.skip("this TRL's chunked function takes no bias (TRL < 1.13)")
    w_out = torch.linspace(0.5, 1.5, n)

    def run(fn):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        leaves.append(None if b is None else b.clone().requires_grad_())
        args = _chunked_args(leaves[0], leaves[1], leaves[2], targets, temperature, softcap, scale, outputs)
        out = _chunked_outputs(fn, *args)
        loss = (w_out * out[0]).sum() + (0.3 * out[1].sum() if out[1] is not None else 0.0)
        loss.backward()
        return out, [None if x is None else x.grad for x in leaves]

    want, want_g = run(TRL_CHUNKED)
    rk_trl.apply()
    ours = trl_utils._ChunkedLogProbFunction
    assert ours is not TRL_CHUNKED
    got, got_g = run(ours)
    for name, a, e in zip(rk_trl.FUSED_OUTPUTS, got, want):
        assert (a is None) == (e is None), name
        if e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        if name == "entropy" and "bias" not in inspect.signature(TRL_CHUNKED.forward).parameters:
            assert not a.requires_grad  # TRL 1.1-1.12's backward drops the entropy's gradient
        else:
            assert a.requires_grad == e.requires_grad, name
        if e.dtype == torch.bool:
            assert torch.equal(a, e), name
        else:
            torch.testing.assert_close(a, e, **TOL, msg=name)
    for name, a, e in zip(("hidden", "weight", "bias"), got_g, want_g):
        if e is not None:
            torch.testing.assert_close(a, e, **GRAD_TOL, msg=name)
    if got[4] is not None:
        assert got[4][0] and not got[4][1]  # first index wins a tie, as TRL's


@pytest.mark.skipif(TRL_CHUNKED is None, reason="this TRL has no chunked LM-head function (TRL < 1.1)")
def test_chunked_head_under_bf16_autocast():
    """TRL projects in the autocast dtype (its tile holds bf16 logits); ours too, but accumulates the
    product in fp32, so the two differ by the bf16 rounding of the logits, not more."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(12, 16, generator=g), torch.randn(40, 16, generator=g) * 0.5
    targets = torch.randint(0, 40, (12,), generator=g)
    args = _chunked_args(hidden, weight, None, targets, 1.0, None, 1.0, ("log_probs", "entropy"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _chunked_outputs(TRL_CHUNKED, *args)
        rk_trl.apply()
        got = _chunked_outputs(trl_utils._ChunkedLogProbFunction, *args)
    exact = _chunked_outputs(TRL_CHUNKED, *_chunked_args(hidden.bfloat16().float(), weight.bfloat16().float(),
                                                         None, targets, 1.0, None, 1.0, ("log_probs", "entropy")))
    for a, e, x in zip(got[:2], want[:2], exact[:2]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=0, atol=0.05)  # bf16 logits of magnitude ~5: ulp 0.03
        torch.testing.assert_close(a, x, rtol=1e-4, atol=1e-4)  # = the fp32 product of the bf16 inputs


@pytest.mark.skipif(not HAS_FUSED_HEAD, reason="add_fused_lm_head appeared in TRL 1.15")
@pytest.mark.parametrize("config", ["plain", "softcap_scale_bias"])
def test_add_fused_lm_head_forward_equals_trls(config):
    """TRL's own fused forward (shift, -100 labels, padding, temperature, loss) around our kernel."""
    model = _tiny_llama(config)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    attention_mask[2, :2] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=rk_trl.FUSED_OUTPUTS)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        (out.loss + 0.2 * out.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    want, want_g = run()
    with rk_trl.applied():
        got, got_g = run()
    mask = labels[:, 1:] != -100
    assert torch.equal(got.label_mask, want.label_mask) and torch.equal(got.label_mask, mask)
    for name in ("loss", *rk_trl.FUSED_OUTPUTS):
        a, e = getattr(got, name), getattr(want, name)
        if e.dtype == torch.bool:
            assert torch.equal(a, e), name
        else:
            torch.testing.assert_close(a, e, **TOL, msg=name)
        if name != "loss":
            assert (a[~mask] == 0).all(), name
    assert got_g.keys() == want_g.keys() and "lm_head.weight" in want_g
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], **GRAD_TOL, msg=n)


@pytest.mark.skipif(TRL_CHUNKED is None, reason="this TRL has no chunked LM-head function (TRL < 1.1)")
def test_chunked_head_largest_allocation_is_smaller():
    """Peak memory proxy on CPU (torch's allocator has no peak counter there): the largest single
    allocation during forward + backward, from torch.profiler, at TRL's own chunk size (32768, what
    add_fused_lm_head passes).  TRL allocates a [min(N, 4096), chunk] buffer; ours one fp32 tile,
    smaller than the [N, V] logits."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    n, h, v = 256, 32, 8000
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)

    def largest(fn):
        leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
        args = _chunked_args(leaves[0], leaves[1], None, targets, 1.0, None, 1.0, ("log_probs", "entropy"))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = _chunked_outputs(fn, *args)
            (out[0].sum() + out[1].sum()).backward()
        return max(e.self_cpu_memory_usage for e in prof.events())

    theirs = largest(TRL_CHUNKED)
    rk_trl.apply()
    ours = largest(trl_utils._ChunkedLogProbFunction)
    assert 0 < ours <= theirs and ours < n * v * 4, (ours, theirs)


# ----------------------------------------------------------------------------- the log-softmax helpers


def _logits_batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 7, 33, generator=g) * 3).to(dtype)
    index = torch.randint(0, 33, (3, 7), generator=g)
    row_mask = torch.ones(3, 7, dtype=torch.bool)
    row_mask[0, 4:] = False  # right padding
    row_mask[1, :2] = False  # a prompt
    return logits, index, row_mask


def _trl_takes(name, arg):
    return arg in inspect.signature(TRL_FNS[name]).parameters


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("masked", [False, True])
def test_selective_log_softmax_equals_trls(temperature, masked):
    logits, index, row_mask = _logits_batch()
    kwargs = {}
    if temperature != 1.0 or masked:
        if not _trl_takes("selective_log_softmax", "temperature"):
            pytest.skip("this TRL's selective_log_softmax takes neither temperature nor row_mask (TRL < 1.14)")
        kwargs = {"temperature": temperature, "row_mask": row_mask if masked else None}
    w = torch.linspace(-1, 2, index.numel()).view(index.shape)

    def run(fn):
        x = logits.clone().requires_grad_()
        out = fn(x, index, **kwargs)
        (w * out).sum().backward()
        return out, x.grad

    want, want_g = run(TRL_FNS["selective_log_softmax"])
    rk_trl.apply()
    assert trl_utils.selective_log_softmax is rk_trl.selective_log_softmax
    got, got_g = run(trl_utils.selective_log_softmax)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_g, want_g, **GRAD_TOL)
    if masked:
        assert (got[~row_mask] == 0).all() and (got_g[~row_mask] == 0).all()


def test_entropy_from_logits_equals_trls():
    logits, _, _ = _logits_batch(seed=2)

    def run(fn):
        x = logits.clone().requires_grad_()
        out = fn(x)
        (out * torch.linspace(0, 1, out.numel()).view(out.shape)).sum().backward()
        return out, x.grad

    want, want_g = run(TRL_FNS["entropy_from_logits"])
    rk_trl.apply()
    got, got_g = run(trl_utils.entropy_from_logits)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_g, want_g, **GRAD_TOL)


@pytest.mark.skipif("selective_log_softmax_and_entropy" not in TRL_FNS,
                    reason="selective_log_softmax_and_entropy appeared in TRL 1.14")
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_equals_trls(entropy_requires_grad):
    logits, index, row_mask = _logits_batch(seed=3)

    def run(fn):
        x = logits.clone().requires_grad_()
        lp, ent = fn(x, index, entropy_requires_grad=entropy_requires_grad, temperature=0.8, row_mask=row_mask)
        assert ent.requires_grad == entropy_requires_grad
        (lp.sum() + (0.5 * ent.sum() if entropy_requires_grad else 0.0)).backward()
        return lp, ent, x.grad

    want = run(TRL_FNS["selective_log_softmax_and_entropy"])
    rk_trl.apply()
    got = run(trl_utils.selective_log_softmax_and_entropy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOL)


def test_bf16_logits_and_the_calls_left_to_trl():
    """bf16 logits: ours is fp32 math on the bf16 values, TRL's CPU path rounds its log-softmax to bf16
    (so: within bf16's rounding).  A top-K index [..., K] and float64 logits go to TRL's own function."""
    logits, index, _ = _logits_batch(torch.bfloat16, seed=4)
    want = TRL_FNS["selective_log_softmax"](logits, index)
    rk_trl.apply()
    got = trl_utils.selective_log_softmax(logits, index)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-2, atol=3e-2)
    exact = TRL_FNS["selective_log_softmax"](logits.float(), index)
    torch.testing.assert_close(got, exact, **TOL)
    topk = logits.float().topk(3, dim=-1).indices
    torch.testing.assert_close(trl_utils.selective_log_softmax(logits.float(), topk),
                               TRL_FNS["selective_log_softmax"](logits.float(), topk), rtol=0, atol=0)
    f64 = logits.double()
    torch.testing.assert_close(trl_utils.entropy_from_logits(f64), TRL_FNS["entropy_from_logits"](f64),
                               rtol=0, atol=0)


def test_bad_input_is_named():
    logits, index, _ = _logits_batch()
    rk_trl.apply()
    with pytest.raises(ValueError, match="temperature"):
        trl_utils.selective_log_softmax(logits, index, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        trl_utils.selective_log_softmax(logits, index + 100)
    with pytest.raises(ValueError, match="outputs"):
        rk_trl.fused_lm_head_logprobs(torch.randn(2, 4), torch.randn(5, 4), None, torch.zeros(2, dtype=torch.long),
                                      outputs=("log_probs", "logits"))
    rk_trl.undo()
    with pytest.raises(ValueError, match="backend"):
        rk_trl.apply(backend="gpu")


# ----------------------------------------------------------------------------- apply / undo


def _trl_bindings(objects):
    """(module, name) -> object for every loaded trl module binding one of ``objects`` under a name
    the adapter patches."""
    names = rk_trl._LOGITS_FUNCTIONS + rk_trl._CHUNKED_NAMES
    return {(m, n): vars(mod)[n] for m, mod in list(sys.modules.items())
            if mod is not None and (m == "trl" or m.startswith("trl.")) for n in names
            if any(vars(mod).get(n) is o for o in objects)}


def _trl_objects():
    return [*TRL_FNS.values(), *([TRL_CHUNKED] if TRL_CHUNKED is not None else [])]


def test_apply_patches_every_importer_and_undo_restores_exactly():
    importlib.import_module("trl.trainer.grpo_trainer")
    importlib.import_module("trl.trainer.dpo_trainer")
    before = _trl_bindings(_trl_objects())
    assert ("trl.trainer.utils", "selective_log_softmax") in before
    if HAS_FUSED_HEAD:  # 1.15+: the class lives in trl.kernels, utils and the trainers import it
        assert {("trl.kernels", "ChunkedLogProbFunction"), ("trl.trainer.utils", "_ChunkedLogProbFunction")} \
            <= before.keys()
    rk_trl.apply()
    rk_trl.apply()  # idempotent
    ours = [*rk_trl._OURS.values(), *([trl_utils._ChunkedLogProbFunction] if TRL_CHUNKED is not None else [])]
    assert _trl_bindings(_trl_objects()) == {}
    during = _trl_bindings(ours)
    assert during.keys() == before.keys()
    for key, obj in during.items():
        assert obj is rk_trl._OURS.get(key[1]) or obj.trl_original is before[key], key
    # a TRL module imported after apply() takes ours by name, and gets TRL's back on undo
    late = types.ModuleType("trl._rk_test_late")
    late.selective_log_softmax = trl_utils.selective_log_softmax
    sys.modules["trl._rk_test_late"] = late
    try:
        assert late.selective_log_softmax is rk_trl.selective_log_softmax
        rk_trl.undo()
        assert late.selective_log_softmax is TRL_FNS["selective_log_softmax"]
    finally:
        del sys.modules["trl._rk_test_late"]
    assert _trl_bindings(_trl_objects()) == before
    assert not rk_trl.is_applied()
    with rk_trl.applied():
        assert rk_trl.is_applied() and trl_utils.selective_log_softmax is rk_trl.selective_log_softmax
    assert _trl_bindings(_trl_objects()) == before
    rk_trl.apply(fused_lm_head=False)
    with pytest.raises(ValueError, match="already applied"):
        rk_trl.apply()
    if TRL_CHUNKED is not None:
        assert trl_utils._ChunkedLogProbFunction is TRL_CHUNKED


def test_unsupported_versions_and_signatures_are_named(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "0.29.1")
    with pytest.raises(RuntimeError, match=r"TRL >= 1\.0; TRL 0\.29\.1"):
        rk_trl.apply()
    assert not rk_trl.is_applied() and trl_utils.selective_log_softmax is TRL_FNS["selective_log_softmax"]

    class FutureChunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, temperature, chunk_size, tile_order):
            raise AssertionError("not called")

    with pytest.raises(RuntimeError, match=r"TRL 9\.9.*unknown argument\(s\) \['tile_order'\]"):
        rk_trl._chunked_replacement(FutureChunked, "9.9")


# ----------------------------------------------------------------------------- the trainers, end to end


def _tiny_llama(config="plain", vocab=None):
    from rlhf.tasks.shift import build_tokenizer, tiny_llama_config

    over = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
            "tie_word_embeddings": False}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(vocab or len(build_tokenizer()), **over))
    if config == "softcap_scale_bias":
        model.config.final_logit_softcapping = 1.5
        model.config.logit_scale = 1.7
        head = model.lm_head
        model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            model.lm_head.weight.copy_(head.weight * 4)
            model.lm_head.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlhf.tasks.shift import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def _count(monkeypatch):
    """Count calls of our kernels (rk.linear_token_logprobs for the LM head, rk.token_logprobs for
    the log-softmax helpers, as the adapter calls them) and of TRL's own chunked function's forward."""
    calls = {"ours": 0, "trl": 0}

    def counting(key, fn):
        @functools.wraps(fn)  # keeps the signature, which the adapter reads
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(rk, "linear_token_logprobs", counting("ours", rk.linear_token_logprobs))
    monkeypatch.setattr(rk, "token_logprobs", counting("ours", rk.token_logprobs))
    if TRL_CHUNKED is not None:
        monkeypatch.setattr(TRL_CHUNKED, "forward", staticmethod(counting("trl", TRL_CHUNKED.forward)))
    return calls


def _train(kind, model_dir, out_dir):
    from rlhf.tasks.shift import build_tokenizer, make_preference_pairs

    tok = build_tokenizer()
    pairs = make_preference_pairs(8, seed=0)
    common = {"output_dir": str(out_dir), "use_cpu": True, "per_device_train_batch_size": 4, "max_steps": 2,
              "logging_steps": 1, "report_to": "none", "seed": 0, "learning_rate": 1e-2, "save_strategy": "no",
              "bf16": False}
    if kind == "grpo":
        def reward(prompts, completions, **_):  # longer completions, and more a's, score higher
            return [len(c) + 0.5 * c.count("a") for c in completions]

        ds = datasets.Dataset.from_list([{"prompt": p["prompt"]} for p in pairs])
        cfg = trl.GRPOConfig(num_generations=4, max_completion_length=5, beta=0.1, temperature=0.9, **common)
        trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=reward, args=cfg, train_dataset=ds,
                                  processing_class=tok)
    else:
        ds = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
        cfg = trl.DPOConfig(beta=0.1, max_length=16, use_weighting=kind == "dpo_wpo", **common)
        trainer = trl.DPOTrainer(model=model_dir, args=cfg, train_dataset=ds, processing_class=tok)
    from torch.profiler import ProfilerActivity, profile

    # Peak memory proxy on CPU (torch's CPU allocator keeps no peak counter): the largest single
    # allocation of the whole run, from torch.profiler.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train()
    largest = max((e.self_cpu_memory_usage for e in prof.events()), default=0)
    logs = [{k: v for k, v in h.items() if k not in ("step_time",)} for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    return logs, largest


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "dpo", "dpo_wpo"])
def test_trainer_runs_our_kernel_with_trls_numbers(kind, model_dir, tmp_path, monkeypatch):
    """Two steps of TRL's trainer from the same seed without and with the adapter: the same loss,
    gradient norm and logged metrics (GRPO: rewards, KL, entropy, clip ratios at temperature 0.9 with
    a reference model; DPO: rewards, log-probs, mean logits, token accuracy; WPO weights from
    log_sum_sq_probs), with every LM-head call of the second run made by our kernel, and no allocation
    of that run larger than the largest of TRL's run."""
    calls = _count(monkeypatch)
    want, their_largest = _train(kind, model_dir, tmp_path / "trl")
    assert calls["ours"] == 0
    trl_calls, calls["trl"] = calls["trl"], 0
    with rk_trl.applied():
        got, our_largest = _train(kind, model_dir, tmp_path / "ours")
    assert calls["trl"] == 0 and calls["ours"] > 0
    assert 0 < our_largest <= their_largest, (our_largest, their_largest)  # no bigger buffer than TRL's
    if trl_calls and kind != "dpo_wpo":  # one kernel call per call TRL made
        assert calls["ours"] == trl_calls
    elif trl_calls:  # WPO: one more (forward-only) call per policy call, for log_sum_sq_probs
        assert trl_calls < calls["ours"] < 2 * trl_calls
    for step, (a, e) in enumerate(zip(got, want)):
        assert a.keys() == e.keys()
        for key in e:
            assert a[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6), (step, key)
    assert any(abs(e["grad_norm"]) > 1e-3 for e in want)  # the runs did train
