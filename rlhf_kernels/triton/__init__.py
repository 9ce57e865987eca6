"""Triton backend: one module per op family.  ``OPS`` maps op name -> implementation."""

OPS: dict = {}
