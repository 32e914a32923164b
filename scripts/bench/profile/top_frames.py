#!/usr/bin/env python3
"""Summarise py-spy's collapsed stacks: top frames by self and inclusive time, and time per layer.

Input: one or more files of ``py-spy record --format raw`` (what profile_workers.sh
brings back, one per worker). Each line is one distinct stack, root first, and the
number of samples that caught it: ``<module> (app.py:3);handle (falcon/app.py:365) 12``.
The samples of all files add up: the workers of a service share its load.

Output: markdown tables (for docs/PERFORMANCE_NOTES.md), percentages of all samples.
py-spy leaves idle samples out by default (a worker waiting in its event loop), so
the percentages are of the time the workers were running Python or the C below it.

- self time: the leaf frame of each sample, as ``function (file:line)``: where the
  CPU was.
- inclusive time: every function on the stack, counted once per sample, without
  the line: a caller's line is the line of its current call, so per line one
  function's time would be split across its call sites. The server layer's
  functions are left out (arbiter, worker loop: the root of every stack the loop
  shows, a dozen rows of the same number); the layer table has their time.
- layers: each frame's file puts it in a layer (LAYERS, first match wins). A
  sample's *self* layer is that of its leaf-most frame that has one: a leaf in the
  standard library's socket.py under redis-py counts as the Redis client. Its
  *inclusive* layers are all those on its stack, so a JSON encode inside the access
  log counts for "json" (self) and for "logging/journal" (inclusive), and the
  inclusive column does not add up to 100%.

Usage: top_frames.py [--top N] [--by-function] FILE...
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVER = "server (gunicorn/meinheld)"
# Layer name -> patterns: a file prefix (as py-spy shortens paths: from the package
# root, e.g. "falcon/app.py", "json/encoder.py", "falcon_svc/cache.py"), or
# "file::Function" for the functions of one file whose name starts so. Checked in this
# order, first match wins: the access line's pieces in gunicorn and our worker module
# before the rest of the server, specific falcon_svc modules before the catch-all.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "logging/journal (the access line too)",
        (
            "logging/",
            "falcon_svc/logs.py",
            "falcon_svc/journal.py",
            "gunicorn/glogging.py",
            "falcon_svc/workers.py::MeinheldLogAdapter",
            "falcon_svc/workers.py::_LoggedResponse",
        ),
    ),
    # meinheld's C loop and HTTP parser run below our worker class's run(): their
    # time is the self time of the worker's Python frames. Our arbiter (systemd.py)
    # and command (cli.py, the falcon-svc script) are the root of every worker stack.
    (
        SERVER,
        (
            "gunicorn/",
            "meinheld/",
            "falcon_svc/workers.py",
            "falcon_svc/gunicorn_workers.py",
            "falcon_svc/systemd.py",
            "falcon_svc/cli.py",
            "falcon-svc",
        ),
    ),
    ("falcon (routing, middleware, media)", ("falcon/",)),
    ("our middleware", ("falcon_svc/middleware/", "falcon_svc/auth/", "falcon_svc/access.py")),
    ("json", ("json/", "orjson/")),
    (
        "redis client (redis-py, cache.py, idempotency.py)",
        ("redis/", "falcon_svc/cache.py", "falcon_svc/idempotency.py"),
    ),
    ("metrics (prometheus_client)", ("prometheus_client/", "falcon_svc/metrics.py")),
    ("request log (rows, queue, psycopg)", ("falcon_svc/requestlog/", "psycopg/", "psycopg_pool/")),
    (
        "model (sklearn, numpy, scipy, our scorer)",
        ("sklearn/", "numpy/", "scipy/", "falcon_svc/model/", "falcon_svc/text.py"),
    ),
    ("our resources and services", ("falcon_svc/",)),
)
# Samples no frame of which is in a layer (standard library only, py-spy's own
# "process"/"thread" frames).
OTHER = "other (standard library, unknown)"
# py-spy writes a running thread with no Python frame as an empty stack (" 147").
# In our meinheld worker that is meinheld's C: it runs each request in a greenlet
# whose stack starts at the app, so around the app the thread runs C with no Python
# frame at all. `py-spy record --native` (blocking) names it: mostly the response's
# writev() (the kernel's loopback TCP send), epoll_wait, the greenlet switch.
NO_PYTHON = "C code, no Python frame (meinheld: response writes, event loop, parser)"
NO_PYTHON_FRAME = "(no Python frame)"

# "function (file:line)"; py-spy writes "function (file)" when it has no line.
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    """One frame of a collapsed stack."""

    function: str
    file: str
    line: int | None

    @property
    def location(self) -> str:
        """Return ``function (file:line)``, as py-spy writes it."""
        if not self.file:
            return self.function
        return f"{self.function} ({self.file}:{self.line})" if self.line is not None else self.function_key

    @property
    def function_key(self) -> str:
        """Return ``function (file)``: the frame without the line it is at."""
        return f"{self.function} ({self.file})" if self.file else self.function


@dataclass(frozen=True)
class Stack:
    """A distinct stack (root first) and how many samples caught it."""

    frames: tuple[Frame, ...]
    count: int


@dataclass
class Profile:
    """Sample counts by self frame, inclusive function and layer."""

    total: int = 0
    by_self: Counter[str] = field(default_factory=Counter)
    by_inclusive: Counter[str] = field(default_factory=Counter)
    layer_self: Counter[str] = field(default_factory=Counter)
    layer_inclusive: Counter[str] = field(default_factory=Counter)


def parse_frame(text: str) -> Frame:
    """Parse ``function (file:line)``; a frame in another shape is kept whole as its function."""
    match = FRAME.match(text)
    if match is None:
        return Frame(text, "", None)
    line = match["line"]
    return Frame(match["function"], match["file"], int(line) if line is not None else None)


def parse_collapsed(lines: Iterable[str], source: str = "<input>") -> list[Stack]:
    """Parse collapsed-stack lines (``a;b;c COUNT``); raise ValueError naming a malformed line."""
    stacks = []
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        stack, space, count = line.rpartition(" ")
        if not space or not count.isdigit():
            raise ValueError(f"{source}:{number}: not 'frame;frame;... COUNT': {line[:120]!r}")
        frames = tuple(parse_frame(part) for part in stack.split(";")) if stack else ()
        stacks.append(Stack(frames, int(count)))
    return stacks


def matches(frame: Frame, pattern: str) -> bool:
    """Return whether a LAYERS pattern (file prefix, or "file::Function" prefix) matches the frame."""
    file, qualified, function = pattern.partition("::")
    if qualified:
        return frame.file == file and frame.function.startswith(function)
    return frame.file.startswith(pattern)


def layer_of(frame: Frame) -> str | None:
    """Return the layer of a frame, or None when no layer claims it."""
    for name, patterns in LAYERS:
        if any(matches(frame, pattern) for pattern in patterns):
            return name
    return None


def aggregate(stacks: Iterable[Stack], *, by_function: bool = False) -> Profile:
    """Count samples per self frame, per inclusive function and per layer (module docstring)."""
    profile = Profile()
    for stack in stacks:
        profile.total += stack.count
        if not stack.frames:
            profile.by_self[NO_PYTHON_FRAME] += stack.count
            profile.layer_self[NO_PYTHON] += stack.count
            profile.layer_inclusive[NO_PYTHON] += stack.count
            continue
        leaf = stack.frames[-1]
        profile.by_self[leaf.function_key if by_function else leaf.location] += stack.count
        frame_layers = [(frame, layer_of(frame)) for frame in stack.frames]
        for key in {frame.function_key for frame, layer in frame_layers if layer != SERVER}:
            profile.by_inclusive[key] += stack.count
        layers = [layer for _, layer in frame_layers if layer is not None] or [OTHER]
        profile.layer_self[layers[-1]] += stack.count
        for layer in set(layers):
            profile.layer_inclusive[layer] += stack.count
    return profile


def ranked(counts: Counter[str], top: int) -> list[tuple[str, int]]:
    """Return the `top` most counted keys, ties in name order (so a report never changes between runs)."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]


def percent(count: int, total: int) -> str:
    """Return ``count`` as a percentage of ``total`` with one decimal."""
    return f"{100 * count / total:.1f}%" if total else "-"


def cell(text: str) -> str:
    """Return text safe inside a markdown table cell, as code."""
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def render(profile: Profile, *, top: int, sources: Sequence[str], by_function: bool = False) -> str:
    """Return the markdown report: top self frames, top inclusive functions, layers."""
    total = profile.total
    out = [f"Samples: {total} from {len(sources)} file(s): {', '.join(sources)} (idle samples excluded by py-spy)", ""]
    self_label = "function (file)" if by_function else "function (file:line)"
    out += [f"### Top {top} frames by self time", "", f"| # | self | samples | {self_label} |", "|---|---|---|---|"]
    for rank, (key, count) in enumerate(ranked(profile.by_self, top), start=1):
        out.append(f"| {rank} | {percent(count, total)} | {count} | {cell(key)} |")
    out += ["", f"### Top {top} functions by inclusive time (the server layer's left out)", ""]
    out.append("| # | inclusive | samples | function (file) |")
    out.append("|---|---|---|---|")
    for rank, (key, count) in enumerate(ranked(profile.by_inclusive, top), start=1):
        out.append(f"| {rank} | {percent(count, total)} | {count} | {cell(key)} |")
    out += ["", "### By layer", "", "| layer | self | inclusive |", "|---|---|---|"]
    for name in [NO_PYTHON] + [name for name, _ in LAYERS] + [OTHER]:
        if profile.layer_inclusive[name] or profile.layer_self[name]:
            shares = f"{percent(profile.layer_self[name], total)} | {percent(profile.layer_inclusive[name], total)}"
            out.append(f"| {name} | {shares} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Read the files named on the command line and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="py-spy --format raw outputs (collapsed stacks)")
    parser.add_argument("--top", type=int, default=15, help="rows in each frame table (default 15)")
    parser.add_argument("--by-function", action="store_true", help="self time per function, not per line")
    args = parser.parse_args(argv)
    stacks = []
    try:
        for path in args.files:
            with path.open(encoding="utf-8") as lines:
                stacks += parse_collapsed(lines, source=str(path))
    except (OSError, ValueError) as ex:
        print(f"top_frames: {ex}", file=sys.stderr)
        return 2
    profile = aggregate(stacks, by_function=args.by_function)
    if profile.total == 0:
        print("top_frames: no samples in " + ", ".join(map(str, args.files)), file=sys.stderr)
        return 1
    sources = [path.name for path in args.files]
    print(render(profile, top=args.top, sources=sources, by_function=args.by_function), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
