from ._main import _entry

_entry()
