"""One-call adapters that make peer models and trainers run rlhf_kernels (see docs/integrations.md).

- :mod:`rlhf_kernels.integrations.hf`: per-token log-probs of any Hugging Face causal LM straight from
  its hidden states (the LM head fused into :func:`rlhf_kernels.linear_token_logprobs`).
- :mod:`rlhf_kernels.integrations.trl`, :mod:`rlhf_kernels.integrations.verl`,
  :mod:`rlhf_kernels.integrations.openrlhf`: patch the peer trainers' hot functions with this
  package's kernels, undoably.

Each submodule imports its peer only when its adapter is called, so importing this package never
pulls in verl, OpenRLHF, TRL or their dependencies.
"""
