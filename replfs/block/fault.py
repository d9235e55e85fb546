"""Fault injection: a pass-through node that fails or delays chosen requests.

Design note
-----------
Like QEMU's blkdebug or nbdkit's error/delay filters, for tests.  The rules
come from a small spec string and can be replaced at run time with
``set_rules(spec)`` (which also resets their counters).  Everything not
matched by a rule goes straight to ``child``.

Spec syntax (whitespace ignored; the empty string means no rules)::

    spec   := item ("," item)*
    item   := "seed=" INT                         RNG seed for prob= (default 0)
            | [ops ":"] action ["@" START "-" END] (":" option)*
    ops    := op ("|" op)*        op: read write zero trim flush any   ("*" = any;
                                  "zero" = write_zeroes; no ops = any)
    action := ERRNO                fail with BlockError(ERRNO): a name (EIO,
                                   ENOSPC, ESHUTDOWN...) or a number
            | "delay=" SECONDS     sleep first (``delay=0`` = just yield to
                                   the scheduler), then pass it on
    option := "count=" N           act on at most N matching requests, then expire
            | "skip=" N            let the first N matching requests through
            | "prob=" P            act with probability P (0..1, seeded RNG)
    START, END: bytes, END exclusive, with an optional K/M/G/T suffix (binary)

A request matches a rule when its op is listed and, if the rule has a range,
the request's bytes overlap it (so ranged rules never match ``flush``).
Rules are looked at in order: every matching delay rule sleeps, and the
first matching error rule raises (after the delays before it in the list).
``skip``/``count``/``prob`` are evaluated only for requests that match op
and range.  Bounds are checked before any rule, and zero-length requests
never reach the rules (:class:`BlockNode` turns them into no-ops first).

The layer is transparent to everything the rules do not name: ``allocation``,
``start_writeback`` and ``abort`` go straight to ``child``, and the
capabilities (``can_writeback``, ``can_abort``) are the child's, so a commit
through a FaultLayer still starts writeback.  Its one edge is ``file``
(``child``); it opens nothing, so ``close()`` closes nothing (the graph owns
``child``: :func:`replfs.block.base.close_graph`).

Examples::

    "write:EIO@0-64K"              every write touching the first 64 KiB fails
    "read:EIO:count=1"             the next read fails, later ones succeed
    "write|zero:ENOSPC:skip=3"     the 4th and later writes/zeroings fail
    "delay=0.5"                    every request waits half a second
    "read:EIO:prob=0.1,seed=7"     10 % of reads fail, reproducibly
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass

import trio

from replfs.block.base import BlockNode, Extent, nbytes
from replfs.errors import BlockError, UsageError

OPS = ("read", "write", "zero", "trim", "flush")
_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass
class FaultRule:
    ops: frozenset
    err: int | None = None  # errno to raise, or None for a delay
    delay: float = 0.0
    start: int | None = None
    end: int | None = None
    count: int | None = None
    skip: int = 0
    prob: float = 1.0
    spec: str = ""

    def matches(self, op: str, offset: int, length: int) -> bool:
        if op not in self.ops:
            return False
        if self.start is not None:
            return length > 0 and offset < self.end and self.start < offset + length
        return True


def _size(text: str) -> int:
    text = text.strip()
    mult = _SUFFIX.get(text[-1:].upper(), 1)
    if mult != 1:
        text = text[:-1]
    return int(text) * mult


def _errno(text: str) -> int:
    if text.isdigit():
        return int(text)
    value = getattr(errno, text.upper(), None)
    if not isinstance(value, int):
        raise UsageError(f"unknown errno {text!r}")
    return value


def parse_rules(spec: str) -> tuple[list[FaultRule], int]:
    """Parse a spec string into ``(rules, seed)``; bad syntax is UsageError."""
    rules: list[FaultRule] = []
    seed = 0
    spec = "".join(spec.split())
    for item in filter(None, spec.split(",")):
        try:
            if item.startswith("seed="):
                seed = int(item[5:])
                continue
            tokens = item.split(":")
            first = tokens[0].split("|")
            if all(t in OPS or t in ("any", "*") for t in first) and len(tokens) > 1:
                ops = set()
                for t in first:
                    ops.update(OPS if t in ("any", "*") else (t,))
                tokens = tokens[1:]
            else:
                ops = set(OPS)
            action, *options = tokens
            rule = FaultRule(ops=frozenset(ops), spec=item)
            if "@" in action:
                action, rng = action.split("@", 1)
                lo, hi = rng.split("-", 1)
                rule.start, rule.end = _size(lo), _size(hi)
                if rule.start >= rule.end:
                    raise ValueError("empty range")
            if action.startswith("delay="):
                rule.delay = float(action[6:])
                if rule.delay < 0:
                    raise ValueError("negative delay")
            else:
                rule.err = _errno(action)
            for opt in options:
                key, _, value = opt.partition("=")
                if key == "count":
                    rule.count = int(value)
                elif key == "skip":
                    rule.skip = int(value)
                elif key == "prob":
                    rule.prob = float(value)
                    if not 0 <= rule.prob <= 1:
                        raise ValueError("prob outside [0, 1]")
                else:
                    raise ValueError(f"unknown option {key!r}")
        except UsageError:
            raise
        except ValueError as e:
            raise UsageError(f"bad fault rule {item!r}: {e}") from None
        rules.append(rule)
    return rules, seed


class FaultLayer(BlockNode):
    def __init__(self, child: BlockNode, rules: str = "", *, name: str | None = None):
        self.child = child
        self.size = child.size
        self.name = name or f"fault({child.name})"
        self.injected = 0
        self.delayed = 0
        self.set_rules(rules)

    def set_rules(self, spec: str) -> None:
        self.rules, seed = parse_rules(spec)
        self.spec = spec
        self._rng = random.Random(seed)

    async def _apply(self, op: str, offset: int, length: int) -> None:
        for rule in self.rules:
            if not rule.matches(op, offset, length):
                continue
            if rule.skip:
                rule.skip -= 1
                continue
            if rule.prob < 1.0 and self._rng.random() >= rule.prob:
                continue
            if rule.count is not None:
                if rule.count <= 0:
                    continue
                rule.count -= 1
            if rule.err is None:
                self.delayed += 1
                await trio.sleep(rule.delay)
            else:
                self.injected += 1
                raise BlockError(
                    rule.err,
                    f"{self.name}: injected {errno.errorcode.get(rule.err, rule.err)} on "
                    f"{op} of {length} bytes at {offset} (rule {rule.spec!r})",
                )

    async def _read(self, offset: int, length: int) -> bytes:
        await self._apply("read", offset, length)
        return await self.child.read(offset, length)

    async def _write(self, offset: int, data, fua: bool) -> None:
        await self._apply("write", offset, nbytes(data))
        await self.child.write(offset, data, fua)

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        await self._apply("zero", offset, length)
        await self.child.write_zeroes(offset, length, fua)

    async def _trim(self, offset: int, length: int) -> None:
        await self._apply("trim", offset, length)
        await self.child.trim(offset, length)

    async def flush(self) -> None:
        await self._apply("flush", 0, 0)
        await self.child.flush()

    def _allocation(self, offset: int, length: int) -> list[Extent]:
        return self.child.allocation(offset, length)

    # -- transparent to the rest ----------------------------------------------------
    @property
    def can_writeback(self) -> bool:
        return self.child.can_writeback

    @property
    def can_abort(self) -> bool:
        return self.child.can_abort

    async def start_writeback(self, offset: int, length: int) -> None:
        await self.child.start_writeback(offset, length)

    def abort(self) -> None:
        self.child.abort()

    def children(self) -> dict[str, BlockNode]:
        return {"file": self.child}

    def statistics(self) -> dict:
        return {
            "name": self.name,
            "rules": self.spec,
            "injected": self.injected,
            "delayed": self.delayed,
        }
