"""A pod of worker processes under one supervisor (`luaq run --processes N`).

The supervisor forks N worker processes from what it loaded (entries and Lua are loaded once,
here) and keeps them running:

* a worker that dies (killed by a signal, or ended though nothing asked it to) is started
  again after a backoff (RestartPolicy: 1 s doubling to 30 s, back to 1 s once a worker ran
  for a minute); when the workers of one process slot die `max_deaths` times in a row, each
  within a minute of its start, the supervisor gives up: it stops the others and exits 1;
* a worker that exits with an error of its own (exit code > 0: it could not reach its broker,
  say) ends the pod with that code, as a single process would;
* workers die with the supervisor (PR_SET_PDEATHSIG): a supervisor killed with SIGKILL leaves
  no worker consuming behind it;
* SIGTERM or SIGINT is passed on to the workers; those still running `grace` + KILL_MARGIN
  seconds later are killed;
* a worker whose handler has been running in Lua for `hard_timeout` seconds at once (a C call
  that does not return, or a budget set too high), or whose event loop gave no beat for as long
  (and the beat's period), is killed and replaced:
  the in-process limits (instructions, memory) cannot stop what never comes back to them. The
  message it ran, or ran when it died by a signal, is blamed; a message blamed for POISON_AFTER
  deaths is poison, and every worker dead-letters it instead of running it (flight.py). Such
  deaths are explained, so they do not count toward giving up: one bad message cannot end a pod.

With metrics, the supervisor serves the pod's on one port (Pod) from the snapshots the workers
write (metrics.Snapshots): the worker knows nothing of its supervisor beyond the snapshots it
writes. Only running workers count for readiness, liveness and the gauges; the counters and
histograms of the dead ones are kept as retired totals, so sums never go down; a snapshot or a
family the supervisor cannot use is left out (and said once), never an error for the scraper.

The loop runs on the main thread, and forks from it: PR_SET_PDEATHSIG fires when the thread
that forked a process ends, and the main thread ends with the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from . import logs
from .flight import BEAT_EVERY, FlightLog, Flights
from .metrics import (
    MAX_USER_SERIES,
    MAX_USER_TOTAL_SERIES,
    STALE_AFTER,
    USER_PREFIX,
    Family,
    Server,
    Snapshots,
    Source,
    merge,
)

_log = logging.getLogger("luaq.supervisor")
EXIT_OK, EXIT_FAILURE = 0, 1
KILL_MARGIN = 0.7  # seconds past the grace period before the workers still running are killed
REAP_MARGIN = 0.25  # and then for them to be gone, before the supervisor leaves anyway (< 1 s)
TICK = 1.0  # the longest the loop sleeps (it wakes at once on a signal or a worker's end)
READY = "luaq_worker_ready"
RETIRED_USER_SERIES = MAX_USER_TOTAL_SERIES  # kept of dead workers' user metrics
MAX_SAID = 1000  # distinct problems logged once each, then no more
POISON_AFTER = 2  # deaths a message is blamed for before it is poison
BLAMES_KEPT = 10_000  # messages blamed once, remembered (the oldest forgotten first)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CAUGHT = (*_STOP_SIGNALS, signal.SIGCHLD)
_PR_SET_PDEATHSIG = 1

try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl  # Linux; loaded before any fork
except (AttributeError, OSError):  # elsewhere the workers outlive a supervisor killed hard
    _prctl = None


@dataclass(frozen=True)
class RestartPolicy:
    delay: float = 1.0  # before the first restart of a slot's worker
    max_delay: float = 30.0  # the delay doubles at each death in a row, up to this
    stable_after: float = 60.0  # a worker that ran this long ends its slot's row of deaths
    max_deaths: int = 5  # deaths in a row of a slot's workers before the supervisor gives up

    def delay_after(self, deaths: int) -> float:
        return float(min(self.max_delay, self.delay * 2 ** (deaths - 1)))


@dataclass
class Slot:
    """One of the N worker processes, across its restarts."""

    index: int
    pid: int = 0  # of the running worker; 0 while none runs
    started: float = 0.0
    deaths: int = 0  # in a row, each within stable_after of its start
    restart_at: float | None = None
    killed: bool = False  # by the supervisor, at the shutdown's deadline
    stuck: str | None = None  # why the supervisor killed it (past its hard timeout)

    @property
    def name(self) -> int:
        return self.index + 1


def _ended(status: int) -> tuple[int, str, bool]:
    """The exit code (1 for a signal), how the process ended in words, and whether it was
    killed (rather than exited)."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return EXIT_FAILURE, f"killed by {signal.Signals(-code).name}", True
    return code, f"exited with {code}", False


class Supervisor:
    def __init__(
        self,
        processes: int,
        target: Callable[[FlightLog], int],
        grace: float,
        *,
        hard_timeout: float,
        until_idle: bool = False,
        snapshots: Snapshots | None = None,
        policy: RestartPolicy | None = None,
    ) -> None:
        """`target` runs a worker in a forked process, reporting into the log it is given, and
        returns its exit code; `until_idle`: a worker that exits 0 is done (else it is
        restarted: nothing asked it to stop)."""
        self.target = target
        self.grace = grace
        self.hard_timeout = hard_timeout
        self.flights = Flights(processes)
        self._blamed: dict[bytes, int] = {}  # message key: deaths it was blamed for
        self.until_idle = until_idle
        self.policy = policy or RestartPolicy()
        self.pod = Pod(processes, snapshots)
        self.slots = [Slot(index) for index in range(processes)]
        self.code = EXIT_OK
        self._server: Server | None = None
        self._stop_at: float | None = None  # when the workers still running get SIGKILL
        self._signals: list[int] = []
        self._wake = (-1, -1)  # the pipe signals wake the loop through
        self._previous: dict[int, Any] = {}  # signal handlers (and -1: wakeup fd) to restore

    def source(self) -> Source:
        return self.pod.source()

    def run(self, server: Server | None = None) -> int:
        """Until every worker is gone: the worst exit code of the last ones (1 when they had to
        be killed, or the supervisor gave up). `server` serves `source()` meanwhile."""
        assert threading.current_thread() is threading.main_thread(), "see the module's doc"
        self._server = server
        logs.share_lines()
        self._catch_signals()
        try:
            for slot in self.slots:
                self._start(slot)
            if server is not None:
                server.start(self.source(), poll_interval=0.1)  # its stop is in the shutdown's time
            while any(slot.pid for slot in self.slots) or self._pending():
                self._wait(self._timeout())
                self.pod.beat = time.monotonic()
                signals, self._signals = self._signals, []
                for signum in signals:
                    if signum in _STOP_SIGNALS:
                        self._stop(signum, EXIT_OK, "signalled")
                for slot in self.slots:
                    self._reap(slot)
                if self._stop_at is None:
                    self._kill_stuck()
                    self._restart_due()
                elif self._overdue():
                    break
        finally:
            if server is not None:
                server.stop()
            self._release_signals()
        return self.code

    # -- the loop's steps ------------------------------------------------------------------------

    def _pending(self) -> bool:
        return any(slot.restart_at is not None for slot in self.slots)

    def _timeout(self) -> float:
        now, timeout = time.monotonic(), TICK
        for slot in self.slots:
            if slot.restart_at is not None:
                timeout = min(timeout, slot.restart_at - now)
        if self._stop_at is not None:
            timeout = min(timeout, self._stop_at - now if self._stop_at > now else 0.05)
        return max(timeout, 0.0)

    def _wait(self, timeout: float) -> None:
        select.select([self._wake[0]], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake[0], 512):
                pass

    def _reap(self, slot: Slot) -> None:
        if not slot.pid:
            return
        try:
            pid, status = os.waitpid(slot.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: how it ended is unknown
            pid, status = slot.pid, signal.SIGKILL
        if pid == 0:
            return
        code, how, killed = _ended(status)
        ran = time.monotonic() - slot.started
        slot.pid = 0
        if slot.stuck is not None:
            how = f"killed: {slot.stuck}"
        if self._stop_at is not None:
            if -os.waitstatus_to_exitcode(status) in _STOP_SIGNALS:
                code = EXIT_OK  # the stop it was passed on, before it had a handler: starting
            self.code = max(self.code, code)
        elif code == EXIT_OK and self.until_idle:
            how = "finished"
        elif code != EXIT_OK and not killed:
            if len(self.slots) > 1:  # (alone, its own last words say it all)
                _log.error(
                    "worker process failed: stopping the others",
                    extra={"slot": slot.name, "pid": pid, "how": how},
                )
            self._stop(signal.SIGTERM, code, "a worker process failed")
        else:
            how = self._died(slot, pid, how, ran, self._blame(slot) if killed else False)
        self.pod.ended(slot.index, pid, how)

    def _died(self, slot: Slot, pid: int, how: str, ran: float, blamed: bool = False) -> str:
        """Restart the slot's worker after a backoff, unless its workers keep dying for no
        reason known (`blamed`: a message was); returns what the slot does now, in words."""
        if not blamed:
            slot.deaths = 1 if ran >= self.policy.stable_after else slot.deaths + 1
        extra = {"slot": slot.name, "pid": pid, "how": how, "ran_s": round(ran, 3)}
        if slot.deaths >= self.policy.max_deaths:
            _log.error(
                "worker processes keep dying: giving up",
                extra={**extra, "deaths": slot.deaths, "within_s": self.policy.stable_after},
            )
            self._stop(signal.SIGTERM, EXIT_FAILURE, "gave up")
            return how
        delay = self.policy.delay_after(max(slot.deaths, 1))
        slot.restart_at = time.monotonic() + delay
        _log.warning("worker process died: restarting it", extra={**extra, "restart_in_s": delay})
        return f"restarting in {delay:g}s ({how})"

    def _kill_stuck(self) -> None:
        """Kill the workers stuck in a handler, or whose loop stopped beating, for
        hard_timeout seconds."""
        now = time.monotonic()
        for slot in self.slots:
            if not slot.pid or slot.stuck is not None:
                continue
            beat, since, _ = self.flights.read(slot.index)
            if since and now - since > self.hard_timeout:
                slot.stuck = f"a handler ran {now - since:.0f}s without returning"
            elif now - beat > self.hard_timeout + BEAT_EVERY:  # (a handler may hold it so)
                slot.stuck = f"its event loop gave no sign of life for {now - beat:.0f}s"
            else:
                continue
            _log.error(
                "worker process stuck: killing it",
                extra={"slot": slot.name, "pid": slot.pid, "why": slot.stuck,
                       "hard_timeout_s": self.hard_timeout},
            )  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGKILL)

    def _blame(self, slot: Slot) -> bool:
        """The message a worker killed by a signal was running, if any, takes the blame; on its
        POISON_AFTER-th death it is poison. Whether a message was blamed."""
        _, since, key = self.flights.read(slot.index)
        if not since:
            return False
        deaths = self._blamed.pop(key, 0) + 1
        if deaths >= POISON_AFTER:
            self.flights.poison(key)
            _log.error(
                "a message killed worker processes: it is poison now, and dead-lettered "
                "(reason killed) or dropped when it comes again",
                extra={"slot": slot.name, "deaths": deaths, "message_key": key.hex()},
            )
            return True
        self._blamed[key] = deaths
        if len(self._blamed) > BLAMES_KEPT:
            del self._blamed[next(iter(self._blamed))]
        return True

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)

    def _stop(self, signum: int, code: int, why: str) -> None:
        """Pass `signum` on to every worker; the ones still running at the deadline are
        killed. Again on each signal (a worker may have missed one while it started)."""
        self.code = max(self.code, code)
        if self._stop_at is None:
            self._stop_at = time.monotonic() + self.grace + KILL_MARGIN
            self.pod.stopping = why
            for slot in self.slots:
                slot.restart_at = None
        for slot in self.slots:
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signum)

    def _overdue(self) -> bool:
        """Kill what still runs at the deadline; True once the supervisor should leave anyway
        (a process the kernel has not let go of REAP_MARGIN seconds after its SIGKILL)."""
        assert self._stop_at is not None
        now = time.monotonic()
        if now < self._stop_at:
            return False
        for slot in self.slots:
            if slot.pid and not slot.killed:
                _log.warning(
                    "worker process still running at the deadline: killed",
                    extra={"slot": slot.name, "pid": slot.pid},
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
                slot.killed = True
        if now < self._stop_at + REAP_MARGIN:
            return False
        self.code = max(self.code, EXIT_FAILURE)
        return True

    # -- forking ---------------------------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        parent = os.getpid()
        self.flights.reset(slot.index)
        with self.pod.lock:  # no server thread holds a lock (stderr's, say) across the fork
            sys.stdout.flush()
            sys.stderr.flush()
            # held back until the new process has its own handlers: none is lost in between
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _CAUGHT)
            try:
                pid = os.fork()
            except OSError as exc:  # a death: tried again after the backoff, given up at length
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                self.pod.down[slot.index] = self._died(slot, 0, f"not forked: {exc}", 0.0)
                return
            if pid == 0:
                self._child(parent, mask, slot)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        slot.pid, slot.started, slot.restart_at, slot.killed = pid, time.monotonic(), None, False
        slot.stuck = None
        self.pod.started(slot.index, pid)
        _log.info("worker process started", extra={"slot": slot.name, "pid": pid})

    def _child(self, parent: int, mask: set[int | signal.Signals], slot: Slot) -> NoReturn:
        code = EXIT_FAILURE
        try:
            if _prctl is not None:
                _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # it died before the line above: so must this one
                os._exit(EXIT_FAILURE)
            self._release_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if self._server is not None:
                self._server.close()  # the supervisor serves
            code = self.target(self.flights.log(slot.index))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except KeyboardInterrupt:  # Ctrl-C before the worker's own handlers: it ran nothing
            code = EXIT_OK
        except BaseException:
            _log.exception("worker process failed")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    # -- signals ---------------------------------------------------------------------------------

    def _catch_signals(self) -> None:
        """SIGTERM, SIGINT and SIGCHLD only note themselves and wake the loop (through the
        wakeup fd), whichever thread the kernel gave them to."""
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake = (read, write)
        self._previous = {-1: signal.set_wakeup_fd(write, warn_on_full_buffer=False)}
        for signum in _CAUGHT:
            self._previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _release_signals(self) -> None:
        """As they were before `run` (also in a new worker process, first thing)."""
        for signum, handler in self._previous.items():
            if signum == -1:
                signal.set_wakeup_fd(handler)
            else:
                signal.signal(signum, handler)
        self._previous = {}
        for fd in self._wake:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake = (-1, -1)


class Pod:
    """What a pod of worker processes reports on one port: from the snapshots of the running
    workers, and the retired counters of the dead ones. The server's threads read it, the
    supervisor's loop changes it, both under `lock`."""

    def __init__(self, processes: int, snapshots: Snapshots | None) -> None:
        self.lock = threading.Lock()
        self.processes = processes
        self.snapshots = snapshots
        self.running: dict[int, tuple[int, float]] = {}  # slot index: pid, started
        self.down: dict[int, str] = dict.fromkeys(range(processes), "starting")  # why not
        self.stopping: str | None = None
        self.beat = time.monotonic()  # the supervisor loop's last sign of life
        self._retired: list[Family] = []  # counters and histograms of workers that ended
        self._said: set[tuple[str, str]] = set()

    def started(self, index: int, pid: int) -> None:
        with self.lock:
            self.running[index] = pid, time.monotonic()
            self.down.pop(index, None)

    def ended(self, index: int, pid: int, how: str) -> Any:
        """A worker is gone: its gauges and readiness with it, its counters retired. Returns
        its last snapshot (None without one): what the supervisor knows of its last moments."""
        with self.lock:
            self.running.pop(index, None)
            self.down[index] = how
            if self.snapshots is None:
                return None
            last = self.snapshots.read(pid)
            self.snapshots.remove(pid)
            report = self._report(pid, last) if last is not None else None  # none yet: no news
            if report is not None:
                self._retire(self._families(report))
            return last

    def source(self) -> Source:
        return Source(self._merged, self._unhealthy, self._unready, self.lock)

    # -- read by the server, under the lock (Source.lock) ----------------------------------------

    def _reports(self) -> list[tuple[int, float, dict[str, Any] | None]]:
        """pid, start and usable snapshot (or None) of every running worker."""
        found = []
        for pid, started in sorted(self.running.values()):
            last = self.snapshots.read(pid) if self.snapshots is not None else None
            found.append((pid, started, self._report(pid, last) if last is not None else None))
        return found

    def _report(self, pid: int, data: Any) -> dict[str, Any] | None:
        if (
            isinstance(data, dict)
            and isinstance(data.get("beat"), int | float)
            and isinstance(data.get("unready"), str | None)
            and isinstance(data.get("families"), list)
        ):
            return data
        self._say("snapshot", str(pid), "a worker process's snapshot cannot be read: left out")
        return None

    def _families(self, report: dict[str, Any]) -> list[Family]:
        families = []
        for data in report["families"]:
            try:
                families.append(Family.from_json(data))
            except ValueError as exc:
                name = data.get("name") if isinstance(data, dict) else None
                self._say("family", str(name)[:200], f"a metric family cannot be read: {exc}")
        return families

    def _retire(self, families: list[Family]) -> None:
        """Counters and histograms only go up: a dead worker's last ones stay in the sums.
        Handlers' own are bounded as a process's are, per metric and in all (past that, new
        series are dropped): else each worker killed with new label sets added its own."""
        retired = {family.name: family for family in self._retired}
        room = RETIRED_USER_SERIES - sum(
            len(family.series) for family in self._retired if family.name.startswith(USER_PREFIX)
        )
        kept = []
        for family in families:
            if family.type == "gauge":
                continue
            if family.name.startswith(USER_PREFIX):
                old = retired[family.name].series if family.name in retired else {}
                series, added = {}, 0
                for key, value in family.series.items():
                    if key not in old:
                        if room <= 0 or len(old) + added >= MAX_USER_SERIES:
                            continue
                        room -= 1
                        added += 1
                    series[key] = value
                family = dataclasses.replace(family, series=series)
            kept.append(family)
        self._retired = merge([self._retired, kept])

    def _say(self, what: str, key: str, message: str) -> None:
        """Log a problem once (the caller holds the lock: stderr is written under it)."""
        if (what, key) in self._said or len(self._said) >= MAX_SAID:
            return
        self._said.add((what, key))
        _log.error(message, extra={what: key})

    def _merged(self) -> list[Family]:
        reports = self._reports()
        ready = self._why_unready(reports) is None
        conflicts: set[str] = set()
        families = merge(
            [*(self._families(r) for _, _, r in reports if r is not None), self._retired],
            conflicts,
        )
        for name in sorted(conflicts):
            self._say(
                "metric", name, "metric left out: worker processes disagree on its type, "
                "labels or buckets",
            )  # fmt: skip
        families = [family for family in families if family.name not in conflicts]
        # the pod's readiness, as /readyz says it: a dead or missing worker makes it 0
        families = [family for family in families if family.name != READY]
        families.append(
            Family(READY, "gauge", "1 when ready for work (/readyz)", merge="min",
                   series={(): int(ready)})
        )  # fmt: skip
        return families

    def _unready(self) -> str | None:
        return self._why_unready(self._reports())

    def _why_unready(self, reports: list[tuple[int, float, dict[str, Any] | None]]) -> str | None:
        if self.stopping is not None:
            return "stopping"
        # which process, when there are several: one pod's only process speaks for the pod
        alone = self.processes == 1
        if self.down:
            index = min(self.down)
            if alone and self.down[index] == "starting":
                return "starting"
            return f"worker process {index + 1} of {self.processes}: {self.down[index]}"
        up = sum(report is not None for _, _, report in reports)
        if up < self.processes:
            return "starting" if alone else f"starting ({up} of {self.processes} processes up)"
        for pid, _, report in reports:
            if report is not None and report["unready"] is not None:
                return report["unready"] if alone else f"process {pid}: {report['unready']}"
        return None

    def _unhealthy(self) -> str | None:
        now = time.monotonic()
        if now - self.beat > STALE_AFTER:
            return f"the supervisor gave no sign of life for {now - self.beat:.0f}s"
        for pid, started, report in self._reports():
            beat = report["beat"] if report is not None else started
            if now - beat > STALE_AFTER:
                return f"worker process {pid} gave no sign of life for {now - beat:.0f}s"
        return None
