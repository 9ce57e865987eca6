"""Integrations: make a peer model or trainer run rlhf_kernels' ops with one call that can be undone.

- :mod:`rlhf_kernels.integrations.hf`: per-token log-probs of any Hugging Face causal LM straight from
  its hidden states (the LM head fused into :func:`rlhf_kernels.linear_token_logprobs`).

Nothing here imports a peer library at import time.
"""
