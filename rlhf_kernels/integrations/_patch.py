"""Bookkeeping shared by the adapters: set attributes, remember the originals, put them back."""

from __future__ import annotations

import contextlib
import importlib
import sys


def import_peer(module_name: str, extra: str):
    """Import a peer module, or say which package is missing and how to get it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"rlhf_kernels.integrations needs {module_name}, which does not import here ({exc}); "
            f"install the peer: pip install 'rlhf-kernels[{extra}]' (see docs/integrations.md)"
        ) from exc


class Patches:
    """Attribute replacements that can be undone in reverse order."""

    def __init__(self):
        self._saved = []  # (owner, name, had_attr, original)

    def __bool__(self):
        return bool(self._saved)

    def set(self, owner, name, value):
        had = name in vars(owner)
        self._saved.append((owner, name, had, vars(owner).get(name)))
        setattr(owner, name, value)

    def set_item(self, mapping, key, value):
        self._saved.append((mapping, key, key in mapping, mapping.get(key)))
        mapping[key] = value

    def rebind_imported(self, prefix, name, original, replacement):
        """Replace ``name`` in every loaded module under ``prefix`` that imported ``original`` by name."""
        for mod_name, module in list(sys.modules.items()):
            if module is None or not (mod_name == prefix or mod_name.startswith(prefix + ".")):
                continue
            if vars(module).get(name) is original:
                self.set(module, name, replacement)

    def undo(self):
        while self._saved:
            owner, name, had, original = self._saved.pop()
            if isinstance(owner, dict):
                if had:
                    owner[name] = original
                else:
                    owner.pop(name, None)
            elif had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def rebind_late_imports(prefix, name, ours, original):
    """Modules imported after apply() took ``ours`` by name: give them the original back on undo."""
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == prefix or mod_name.startswith(prefix + ".")):
            continue
        if vars(module).get(name) is ours:
            setattr(module, name, original)


def applied_context(apply, undo, is_applied):
    """The ``applied(**kwargs)`` context manager of an adapter: runs the block with ``apply(**kwargs)``
    in force, then ``undo()`` unless the adapter was already applied before the block."""

    @contextlib.contextmanager
    def applied(**kwargs):
        """``with applied(): ...`` runs the block with :func:`apply` in force, then :func:`undo`."""
        already = is_applied()
        apply(**kwargs)
        try:
            yield
        finally:
            if not already:
                undo()

    return applied
