from __future__ import annotations

import pytest

from pruneapp import errors
from pruneapp.errors import PruneAppError

FAMILY = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, PruneAppError)]


def test_family_is_documented_in_the_module_docstring() -> None:
    assert len(FAMILY) == 7
    assert all(cls.__name__ in errors.__doc__ for cls in FAMILY)


@pytest.mark.parametrize("cls", FAMILY)
def test_messages_are_one_line_and_exit_code_is_2(cls: type[PruneAppError]) -> None:
    exc = cls("The file is\n  truncated;\tsave it again.")
    assert str(exc) == exc.message == "The file is truncated; save it again."
    assert exc.exit_code == 2 and isinstance(exc, Exception)
