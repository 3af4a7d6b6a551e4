"""__all__ is honest: every exported name exists, and every public name is exported."""

import nanscope


def test_all_names_resolve():
    for name in nanscope.__all__:
        assert getattr(nanscope, name) is not None, name


def test_public_api_is_small():
    assert len(nanscope.__all__) <= 16
    assert {"Diagnosis", "NonFiniteError", "Category", "Policy"} <= set(nanscope.__all__)
