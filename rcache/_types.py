"""Type-level contracts: ParamSpec Protocols for decorated functions.

Decorated functions keep their exact signature under mypy. The Protocols carry the
helpers (``invalidate``, ``refresh``, ``key_for``) and ``__get__`` overloads so that
decorated methods bind like functions (tenacity #532, PR #668).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

__all__ = ["AsyncCachedFunction", "CachedFunction"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R2 = TypeVar("R2")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")
T = TypeVar("T")


class CachedFunction(Protocol[P, R_co]):
    """A sync function decorated with ``@cache.cached``."""

    __wrapped__: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the entry for these arguments; True if one was there."""
        ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Recompute and store the entry for these arguments; return the new value."""
        ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The full Redis key for these arguments."""
        ...

    def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1)."""
        ...

    @overload
    def __get__(self: T, instance: None, owner: type[Any] | None = None) -> T: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R2],
        instance: S,
        owner: type[Any] | None = None,
    ) -> CachedFunction[P2, R2]: ...


class AsyncCachedFunction(Protocol[P, R_co]):
    """An ``async def`` function decorated with ``@cache.cached``; helpers are coroutines."""

    __wrapped__: Callable[..., Any]

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the entry for these arguments; True if one was there."""
        ...

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Recompute and store the entry for these arguments; return the new value."""
        ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The full Redis key for these arguments (no IO, so not a coroutine)."""
        ...

    async def invalidate_all(self) -> bool:
        """Drop every entry of this function in O(1)."""
        ...

    @overload
    def __get__(self: T, instance: None, owner: type[Any] | None = None) -> T: ...

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[S, P2], R2],
        instance: S,
        owner: type[Any] | None = None,
    ) -> AsyncCachedFunction[P2, R2]: ...
