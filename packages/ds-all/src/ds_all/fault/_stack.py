"""Where a thread is: a short, readable summary of its Python stack, and whether it is blocked
in a collective. Used by the watchdog to say what a stalled rank was doing."""

from __future__ import annotations

import linecache
import os
import sys
import types
from dataclasses import dataclass

import torch

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_DIST_DIR = os.path.join(_TORCH_DIR, "distributed") + os.sep
# Frames of these packages are library frames; the first frame outside them is "user code".
_LIB_MARKERS = (_TORCH_DIR, f"{os.sep}ds_", f"{os.sep}threading.py")


@dataclass(frozen=True)
class Where:
    """The innermost frame, the innermost frame of user code, and whether the innermost frame
    waits on a collective (a torch.distributed call or a ``.wait()`` on an async work)."""

    innermost: str
    user: str
    in_collective: bool

    def describe(self) -> str:
        if self.user and self.user != self.innermost:
            return f"{self.innermost} (called from {self.user})"
        return self.innermost


def _fmt(frame: types.FrameType, lineno: int | None = None) -> str:
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages" + os.sep, "src" + os.sep):
        i = path.rfind(marker)
        if i >= 0:
            path = path[i + len(marker) :]
            break
    lineno = frame.f_lineno if lineno is None else lineno
    line = linecache.getline(code.co_filename, lineno).strip()
    return f"{path}:{lineno} in {code.co_name}" + (f": {line}" if line else "")


def _is_lib(frame: types.FrameType) -> bool:
    return any(m in frame.f_code.co_filename for m in _LIB_MARKERS)


def frame_is_collective(frame: types.FrameType) -> bool:
    if frame.f_code.co_filename.startswith(_TORCH_DIST_DIR):
        return True
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    return ".wait(" in line


def where(frame: types.FrameType | None) -> Where:
    if frame is None:
        return Where("(thread gone)", "", False)
    innermost = frame
    user = None
    f: types.FrameType | None = frame
    while f is not None:
        if user is None and not _is_lib(f):
            user = f
        f = f.f_back
    return Where(_fmt(innermost), _fmt(user) if user else "", frame_is_collective(innermost))


def thread_where(thread_id: int) -> Where:
    return where(sys._current_frames().get(thread_id))


def collective_from_traceback(tb: types.TracebackType | None) -> str:
    """Name the collective an exception came out of: the torch.distributed function that user
    or library code called (``all_reduce``, ``barrier``, ...) and from where, or the
    ``.wait()`` line of an async one."""
    frames: list[tuple[types.FrameType, int]] = []
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    in_torch = [f.f_code.co_filename.startswith(_TORCH_DIR) for f, _ in frames]
    for i, (f, _) in enumerate(frames):
        # the outermost torch.distributed function entered from outside torch
        if (
            f.f_code.co_filename.startswith(_TORCH_DIST_DIR)
            and f.f_code.co_name not in ("wrapper", "_fn")
            and i > 0
            and not in_torch[i - 1 - _skip_wrappers(frames, i)]
        ):
            caller, line = frames[i - 1 - _skip_wrappers(frames, i)]
            return f"torch.distributed.{f.f_code.co_name} called from {_fmt(caller, line)}"
    if frames and frame_is_collective(frames[-1][0]):
        return f"the wait on an async collective at {_fmt(*frames[-1])}"
    return f"a collective reached from {_fmt(*frames[-1])}" if frames else "a collective"


def _skip_wrappers(frames: list[tuple[types.FrameType, int]], i: int) -> int:
    """How many torch decorator frames (c10d_logger's ``wrapper``) sit right above frame i."""
    n = 0
    while i - 1 - n > 0 and frames[i - 1 - n][0].f_code.co_name in ("wrapper", "_fn"):
        n += 1
    return n
