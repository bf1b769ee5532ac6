"""Decode media in a child process, so that a segfault or hang in PyAV / Pillow costs one file.

``DecodeSandbox`` forks one long-lived child per decoding worker (cheap: the child already
has every module imported) and sends it one file at a time over a pipe; the decoded frames
come back pickled. If the child dies (SIGSEGV, SIGABRT, out of memory) the file is skipped
as ``decoder_crashed``; if no answer comes within the timeout the child is killed and the file
is skipped as ``decode_timeout``. Either way a fresh child takes the next file. A decoder's
ordinary ``SkipSample`` comes back as itself.

``decode_in_process`` is the reference path (``--decode-isolation none``) the sandbox must match.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import select
import signal
import time
from typing import Any

from megassm.data import media
from megassm.data.media import Frames, SkipSample

_DECODERS = {"image": "load_image", "video": "load_video"}


def decode_in_process(kind: str, *args: Any) -> Frames:
    return getattr(media, _DECODERS[kind])(*args)  # looked up at call time, as in the child


class _ChildGone(Exception):
    pass


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(data).to_bytes(8, "little") + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    out = bytearray()
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - len(out), 1 << 20))
        if not chunk:
            raise _ChildGone
        out += chunk
    return bytes(out)


def _recv(fd: int, deadline: float | None = None) -> Any:
    n = int.from_bytes(_read_exact(fd, 8, deadline), "little")
    return pickle.loads(_read_exact(fd, n, deadline))


def _serve(req: int, res: int) -> None:
    """Child: decode requests until the parent closes the request pipe."""
    for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT):
        signal.signal(sig, signal.SIG_DFL)  # die as the signal says (no worker handler, no traceback dump)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; the child ends with the pipe
    faulthandler.disable()
    while True:
        try:
            kind, args = _recv(req)
        except _ChildGone:
            return
        try:
            out: tuple = ("ok", decode_in_process(kind, *args))
        except SkipSample as e:
            out = ("skip", e.reason, e.detail)
        except Exception as e:  # decoders map their own errors to SkipSample; anything else is still one file
            out = ("skip", "corrupt_video" if kind == "video" else "corrupt_image", f"{type(e).__name__}: {e}")
        _send(res, out)


class DecodeSandbox:
    """A child process that runs ``media.load_image`` / ``media.load_video`` with a per-file timeout."""

    def __init__(self, timeout_s: float = 300.0):
        if timeout_s <= 0:
            raise ValueError(f"decode timeout {timeout_s} s must be > 0")
        self.timeout_s = timeout_s
        self.pid: int | None = None
        self.restarts = 0

    def _start(self) -> None:
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                os.close(req_w)
                os.close(res_r)
                _serve(req_r, res_w)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(res_w)
        self.pid, self._req, self._res = pid, req_w, res_r

    def _stop(self, kill: bool) -> int:
        """End the child; its wait status."""
        pid, self.pid = self.pid, None
        os.close(self._req)
        os.close(self._res)
        if kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return os.waitpid(pid, 0)[1]

    def decode(self, kind: str, *args: Any) -> Frames:
        """Frames of one file, or SkipSample (its own reason, decoder_crashed, decode_timeout)."""
        if self.pid is None:
            self._start()
        try:
            _send(self._req, (kind, args))
            msg = _recv(self._res, time.monotonic() + self.timeout_s)
        except (_ChildGone, BrokenPipeError):
            status = self._stop(kill=False)
            self.restarts += 1
            how = (f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                   else f"exit status {os.WEXITSTATUS(status)}")
            raise SkipSample("decoder_crashed", f"the {kind} decoder process died ({how})") from None
        except TimeoutError:
            self._stop(kill=True)
            self.restarts += 1
            raise SkipSample("decode_timeout", f"no {kind} decoded after {self.timeout_s:g} s; decoder "
                             "process killed (raise --decode-timeout for very long videos)") from None
        if msg[0] == "skip":
            raise SkipSample(msg[1], msg[2])
        return msg[1]

    def close(self) -> None:
        if self.pid is not None:
            self._stop(kill=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
