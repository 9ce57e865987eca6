"""rlhf_kernels.integrations.hf: per-token log-probs of Hugging Face causal LMs from the hidden states.

Against the logits path (``model(...).logits`` -> ``rk.token_logprobs`` with shifted labels): values
and the gradients of every parameter (the tied embedding included), for Llama (tied and untied), GPT-2,
Phi (an LM head with a bias) and Gemma 2 (final logit soft-capping read from the config); the LM head
module is never called; ``generate`` still works with the patch on; DDP (two gloo processes) still
all-reduces the gradients; PEFT models pass the keyword through."""

import os
import socket

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.integrations import hf

transformers = pytest.importorskip("transformers")

BACKENDS = ["reference", "cpu"]
V = 61


def _llama(tied):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _phi():  # lm_head = nn.Linear(..., bias=True)
    cfg = transformers.PhiConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attention_dropout=0.0)
    return transformers.PhiForCausalLM(cfg)


def _gemma2():  # final_logit_softcapping from the config
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    max_position_embeddings=32, final_logit_softcapping=2.0,
                                    attn_logit_softcapping=None)
    return transformers.Gemma2ForCausalLM(cfg)


MODELS = {"llama_untied": lambda: _llama(False), "llama_tied": lambda: _llama(True), "gpt2": _gpt2,
          "phi_bias": _phi, "gemma2_softcap": _gemma2}


def _make(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # make the bias and the logits large enough that a missing term shows
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            head.bias.normal_(0, 1.0)
        head.weight.mul_(8.0)
    return model


def _batch(seed=0, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100  # a prompt
    return input_ids, attention_mask, labels


def _logits_path(model, input_ids, attention_mask, labels, temperature, backend):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    return rk.token_logprobs(logits, shifted, temperature=temperature, return_entropy=True, backend=backend)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _HeadCalled(AssertionError):
    pass


def _forbid_head(model):
    def hook(*_):
        raise _HeadCalled("the LM head module was called")

    return hf.unwrap_causal_lm(model).get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_values_and_gradients_equal_the_logits_path(name, backend):
    model = _make(name)
    input_ids, attention_mask, labels = _batch()
    w = torch.linspace(0.5, 1.5, input_ids.numel()).view(input_ids.shape)
    want, want_h = _logits_path(model, input_ids, attention_mask, labels, 0.8, backend)
    g_want = _grads(model, (w * want).sum() + 0.3 * want_h.sum())
    handle = _forbid_head(model)
    try:
        got, got_h = hf.causal_lm_logprobs(model, input_ids, attention_mask, labels, temperature=0.8,
                                           return_entropy=True, backend=backend)
        g_got = _grads(model, (w * got).sum() + 0.3 * got_h.sum())
    finally:
        handle.remove()
    assert got.shape == got_h.shape == input_ids.shape and got.dtype == torch.float32
    assert (got[:, -1] == 0).all() and (got[labels.roll(-1, 1) == -100] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    assert g_got.keys() == g_want.keys() == {n for n, _ in model.named_parameters()}
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-4, atol=1e-5, msg=n)


def test_the_config_transform_is_applied():
    """Without the soft-cap from the config the values differ: the comparison above can fail."""
    model = _make("gemma2_softcap")
    input_ids, attention_mask, labels = _batch()
    want, _ = _logits_path(model, input_ids, attention_mask, labels, 1.0, "reference")
    got = hf.causal_lm_logprobs(model, input_ids, attention_mask, labels, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.config.final_logit_softcapping = None
    assert hf.head_transform(model.config) == (1.0, None)
    uncapped = hf.causal_lm_logprobs(model, input_ids, attention_mask, labels, backend="reference")
    assert (uncapped - want).abs().max() > 1e-2
    cfg = transformers.PretrainedConfig(logits_scaling=4.0, final_logit_softcapping=30.0)
    assert hf.head_transform(cfg) == (0.25, 30.0)


def test_default_labels_are_the_input_ids_without_padding():
    model = _make("llama_untied")
    input_ids, attention_mask, _ = _batch()
    a = hf.causal_lm_logprobs(model, input_ids, attention_mask, backend="cpu")
    b = hf.causal_lm_logprobs(model, input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100),
                              backend="cpu")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_generate_still_works_and_disable_undoes_the_patch():
    model = _make("llama_untied").eval()
    ids = torch.randint(0, V, (2, 4))
    before = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                            pad_token_id=0)
    hf.enable_fused_logprobs(model)
    hf.enable_fused_logprobs(model)  # idempotent
    assert hf.is_fused_logprobs_enabled(model)
    assert "input_ids" in __import__("inspect").signature(model.forward).parameters
    after = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(before, after)
    logits = model(input_ids=ids).logits  # the ordinary forward is unchanged
    assert logits.shape == (2, 4, V)
    hf.disable_fused_logprobs(model)
    assert not hf.is_fused_logprobs_enabled(model) and "forward" not in vars(model)


def test_bad_input_is_named():
    model = _make("llama_untied")
    input_ids, attention_mask, labels = _batch()
    with pytest.raises(ValueError, match="labels"):
        hf.causal_lm_logprobs(model, input_ids, attention_mask, labels[:, 1:])
    with pytest.raises(ValueError, match="temperature"):
        hf.causal_lm_logprobs(model, input_ids, attention_mask, labels, temperature=0.0)
    with pytest.raises(TypeError, match="model"):
        hf.causal_lm_logprobs(torch.nn.Linear(2, 2), input_ids)


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _make("llama_tied")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        input_ids, attention_mask, labels = _batch(B=4)
        part = slice(2 * rank, 2 * rank + 2)
        handle = _forbid_head(ddp)
        lp = hf.causal_lm_logprobs(ddp, input_ids[part], attention_mask[part], labels[part], backend="cpu")
        lp.sum().backward()
        handle.remove()
        out[rank] = {n: p.grad.clone() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_sync_gradients():
    import torch.multiprocessing as mp

    model = _make("llama_tied")
    input_ids, attention_mask, labels = _batch(B=4)
    # DDP averages over the 2 ranks: the gradient of half the global sum
    (hf.causal_lm_logprobs(model, input_ids, attention_mask, labels, backend="cpu").sum() / 2).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)  # rank 0's half alone: what a forward bypassing DDP would leave
    (hf.causal_lm_logprobs(model, input_ids[:2], attention_mask[:2], labels[:2], backend="cpu").sum()).backward()
    local = {n: p.grad.clone() for n, p in model.named_parameters()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    for rank in (0, 1):
        for n in want:
            torch.testing.assert_close(out[rank][n], want[n], rtol=1e-4, atol=1e-6, msg=f"rank {rank} {n}")
    assert not all(torch.allclose(out[0][n], local[n], rtol=1e-3, atol=1e-5) for n in want)


def test_peft_model_passes_the_keyword_through():
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install --no-deps peft)")
    model = _make("llama_untied")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                      init_lora_weights=False))
    input_ids, attention_mask, labels = _batch()
    want, _ = _logits_path(lora, input_ids, attention_mask, labels, 1.0, "cpu")
    g_want = _grads(lora, want.sum())
    handle = _forbid_head(lora)
    got = hf.causal_lm_logprobs(lora, input_ids, attention_mask, labels, backend="cpu")
    g_got = _grads(lora, got.sum())
    handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert g_got.keys() == g_want.keys() and any("lora" in n for n in g_got)
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-4, atol=1e-5, msg=n)
