"""One-call adapters that make peer trainers run rlhf_kernels (see docs/integrations.md).

Each submodule imports its peer only when its adapter is called, so importing this package never
pulls in verl, OpenRLHF, TRL or their dependencies.
"""
