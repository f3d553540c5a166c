"""The header type the request path passes around."""

from __future__ import annotations

from typing import TypeAlias

# (name, value), names lower-case. Declared variadic on purpose: compiled code (mypyc) then keeps each header
# the Python tuple it already is, where a ``tuple[bytes, bytes]`` would be unpacked into a C struct and packed
# into a new tuple whenever it is stored or passed on (a tenth of the request path's allocations).
Header: TypeAlias = tuple[bytes, ...]
