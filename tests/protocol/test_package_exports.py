"""autoglm.protocol's public names."""

from __future__ import annotations


def test_package_names_load_lazily_and_all_resolve() -> None:
    """autoglm.protocol lists its lazily loaded names twice (for type checkers and at run time): they must agree."""
    import autoglm.protocol as p
    from autoglm.protocol import _errors

    errors = {n for n in p.__all__ if hasattr(_errors, n)}
    assert set(p._LAZY) == set(p.__all__) - errors
    assert all(getattr(p, n) is not None for n in p.__all__)
