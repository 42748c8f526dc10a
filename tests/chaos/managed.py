"""A child process of the suite: its own session, its output appended to a log file, gone when
the suite is gone (even after `kill -9` of the suite), and stopped or killed with everything it
started."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from b24sync.serving import die_with_parent


class ProcessExitedError(RuntimeError):
    pass


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.starts = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def check_running(self) -> None:
        if self._popen is not None and self._popen.poll() is not None:
            raise ProcessExitedError(
                f"{self.name} exited with code {self._popen.returncode}; see {self.log_path}"
            )

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._close_log()
        self._log = self.log_path.open("ab")
        self.starts += 1
        self._note(f"start #{self.starts}: {' '.join(self.argv)}")
        self._popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            user=self.user,
            # A session of its own: a kill takes what the process started too, and Ctrl-C in
            # the terminal reaches only the suite, which stops everything in order.
            start_new_session=True,
            # Set after the switch to `user`, which would clear it.
            preexec_fn=functools.partial(die_with_parent, self.stop_signal),
        )

    def wait(self, wait_s: float) -> int:
        """The exit code of a process that ends by itself (`b24sync migrate`)."""
        assert self._popen is not None
        code = self._popen.wait(wait_s)
        self._close_log()
        return code

    def kill(self) -> None:
        """`kill -9` of the process and of everything in its session."""
        if self._popen is None:
            return
        self._note("kill -9")
        self._kill_session()
        self._popen.wait()

    def stop(self, wait_s: float = 30.0) -> int | None:
        """Asks the process to stop (its stop signal); kills the session if it does not in
        time, and kills whatever it left behind in its session."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._note(f"stop ({self.stop_signal.name})")
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(self.stop_signal)
            try:
                self._popen.wait(wait_s)
            except subprocess.TimeoutExpired:
                self._note(f"did not stop in {wait_s:.0f} s")
        self._kill_session()
        code = self._popen.wait()
        self._close_log()
        return code

    def _kill_session(self) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)

    def _note(self, text: str) -> None:
        """A line of the suite's own in the process's log, so restarts are easy to find."""
        if self._log is not None and not self._log.closed:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            self._log.write(f"--- chaos {stamp} {self.name}: {text}\n".encode())
            self._log.flush()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
