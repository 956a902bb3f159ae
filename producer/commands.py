"""Redis commands written down, not sent: the command list a compare-and-set call carries.

``producer.store`` decides a record change in Python and hands Redis the whole change as one script
call (``producer/lua/cas.lua``) whose argument is this list, as JSON. ``Commands`` offers the few
redis-py pipeline methods the store's writers call (``JobStore._write``, ``_apply`` and the
``producer.arq_wire`` helpers), with the same arguments, and records each as the strings Redis would
receive: no redis-py pipeline is built and no argument is converted twice on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Not a Redis command: ``Commands.hadd``'s step, which ``producer/lua/cas.lua`` carries out.
HADD = "FLEXQ.HADD"


def arg(value: Any) -> str:
    """One command argument as the text Redis receives (redis-py's encoding: floats by ``repr``)."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if kind is bytes:
        return value.decode()  # type: ignore[no-any-return]
    if kind is float:
        return repr(value)
    return str(value)


class Commands:
    """Commands in the order they were asked for, each ``[NAME, arg, ...]`` of strings."""

    __slots__ = ("stack",)

    def __init__(self) -> None:
        self.stack: list[list[str]] = []

    def set(self, name: str, value: Any, ex: int | None = None, px: int | None = None) -> None:
        command = ["SET", name, arg(value)]
        if ex is not None:
            command += ["EX", str(int(ex))]
        if px is not None:
            command += ["PX", str(int(px))]
        self.stack.append(command)

    def delete(self, *names: str) -> None:
        self.stack.append(["DEL", *names])

    def zadd(self, name: str, mapping: Mapping[str, float | int], xx: bool = False) -> None:
        command = ["ZADD", name, "XX"] if xx else ["ZADD", name]
        for member, score in mapping.items():
            command += [arg(score), arg(member)]
        self.stack.append(command)

    def zrem(self, name: str, *values: str) -> None:
        self.stack.append(["ZREM", name, *values])

    def xadd(self, name: str, fields: Mapping[str, Any], maxlen: int | None = None, approximate: bool = True) -> None:
        command = ["XADD", name]
        if maxlen is not None:
            command += ["MAXLEN", "~", str(maxlen)] if approximate else ["MAXLEN", str(maxlen)]
        command.append("*")
        for key, value in fields.items():
            command += [arg(key), arg(value)]
        self.stack.append(command)

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self.stack.append(["HINCRBY", name, key, str(int(amount))])

    def hincrbyfloat(self, name: str, key: str, amount: float = 1.0) -> None:
        self.stack.append(["HINCRBYFLOAT", name, key, repr(float(amount))])

    def hadd(self, name: str, amounts: Mapping[str, float]) -> None:
        """Add each amount to its field of hash ``name`` (as HINCRBYFLOAT would, field by field) in two
        commands instead of one per field: ``cas.lua`` reads the fields (HMGET) and writes the sums (HSET)."""
        command = [HADD, name]
        for key, amount in amounts.items():
            command += [key, arg(amount)]
        self.stack.append(command)

    def lpush(self, name: str, *values: Any) -> None:
        self.stack.append(["LPUSH", name, *(arg(value) for value in values)])

    def ltrim(self, name: str, start: int, end: int) -> None:
        self.stack.append(["LTRIM", name, str(start), str(end)])

    def pexpire(self, name: str, time: int) -> None:
        self.stack.append(["PEXPIRE", name, str(int(time))])
