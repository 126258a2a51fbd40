"""Math answer checking with math-verify in a pool of killable worker processes.

Why not multiprocessing.Pool or math-verify's own timeouts: math-verify times out with
signal.alarm, which cannot interrupt sympy while it sits in C code (e.g. `\\boxed{9^{9^{9^{9}}}}`
builds a gigantic integer), and a Pool cannot kill one stuck task. Here every answer gets a hard
wall-clock limit; a worker past it is SIGKILLed and replaced, the answer scores 0 and a timeout
is counted. A worker that dies (segfault, OOM kill) is replaced, wherever it dies: while idle
(the send to it fails: the answer goes back to the queue), while checking an answer (the answer
is retried once on a fresh worker, then scores 0 and counts a crash) or while starting up
(respawned; only `MAX_STARTUP_FAILURES` deaths in a row of one slot, a broken environment, raise).
The training run never waits longer than about `timeout_s` per answer (twice for a retried crash)
and never dies because of a checker.

Workers are started with `spawn` (no inherited CUDA / torch state); scripts that use this must
guard their entry point with `if __name__ == "__main__":`.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import weakref
from multiprocessing.connection import wait

log = logging.getLogger(__name__)

_READY = "ready"
MAX_STARTUP_FAILURES = 3  # consecutive start-up deaths of one worker slot before giving up


def check_answer(response: str, ground_truth: str) -> bool:
    """True if math-verify finds the response's final answer equal to the ground truth.

    The ground truth is wrapped in \\boxed{} so plain ("1/2"), LaTeX ("\\frac{1}{2}") and boxed
    forms all parse; the response may be a full solution (math-verify takes its last boxed or
    final answer). Call only in a worker: this has no time limit of its own.
    """
    from math_verify import parse, verify

    gold = parse("\\boxed{" + ground_truth + "}", parsing_timeout=None) or parse(ground_truth, parsing_timeout=None)
    pred = parse(response, parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


def _worker_main(conn, debug_hooks: bool) -> None:
    # math-verify warns once that its own timeouts are off; the parent enforces the limit.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Import and exercise the parser before "ready": its lazy imports take seconds on a loaded
    # machine and must not count against the first answer's time limit.
    check_answer("\\boxed{\\frac{1}{2}}", "0.5")
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, response, gt = msg
        if debug_hooks:
            if response.startswith("__SLEEP__:"):  # "__SLEEP__:<s>" or "__SLEEP__:<s>:<response>"
                _, secs, *rest = response.split(":", 2)
                time.sleep(float(secs))
                response = rest[0] if rest else response
            elif response == "__CRASH__":
                os._exit(13)
        try:
            reward, err = (1.0 if check_answer(response, gt) else 0.0), None
        except Exception as e:  # a parse/verify bug scores 0; the run goes on
            reward, err = 0.0, f"{type(e).__name__}: {e}"[:300]
        conn.send((idx, reward, err))


class _Worker:
    def __init__(self, ctx, debug_hooks: bool):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, debug_hooks), daemon=True)
        self.proc.start()
        child.close()  # so recv() sees EOF when the worker dies
        self.started = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def stop(self, kill: bool = False) -> None:
        if not kill and self.proc.is_alive():
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _shutdown(workers: list) -> None:
    for w in workers:
        try:
            w.stop()
        except Exception:
            pass


class MathVerifyReward:
    """RewardFn: 1.0 if math-verify judges the answer equal to the ground truth, else 0.0."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, start_method: str = "spawn",
                 startup_timeout_s: float = 120.0, debug_hooks: bool = False):
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context(start_method)
        self._debug = debug_hooks  # tests only: "__SLEEP__:<s>" and "__CRASH__" responses
        self._workers = [_Worker(self._ctx, debug_hooks) for _ in range(num_workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.totals = {"timeouts": 0, "crashes": 0, "errors": 0, "respawns": 0, "retries": 0, "scored": 0}
        self._startup_failures = [0] * num_workers  # per slot, consecutive

    def _replace(self, w: _Worker) -> _Worker:
        w.stop(kill=True)
        slot = self._workers.index(w)
        self._workers[slot] = new = _Worker(self._ctx, self._debug)
        return new

    def score(self, responses: list[str], ground_truths: list[str]) -> tuple[list[float], dict]:
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        if not self._workers:
            raise RuntimeError("MathVerifyReward is closed")
        t0 = time.monotonic()
        n = len(responses)
        rewards = [0.0] * n
        counts = {"timeouts": 0, "crashes": 0, "errors": 0, "respawns": 0, "retries": 0}
        tried = [0] * n  # attempts that ended in a worker death
        todo = list(range(n - 1, -1, -1))  # pop() from the end keeps submission order
        done = 0

        def respawn(w: _Worker, why: str) -> None:
            counts["respawns"] += 1
            log.warning("math-verify worker %s (exit code %s); respawned", why, w.proc.exitcode)
            self._replace(w)

        for w in list(self._workers):  # a task left by an interrupted call: its worker is unusable
            if w.task is not None:
                respawn(w, "left busy by an earlier call")
        while done < n:
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.task is None and todo:
                    i = todo.pop()
                    try:
                        w.conn.send((i, responses[i], ground_truths[i]))
                    except (OSError, ValueError):  # died while idle (BrokenPipeError, reset, closed)
                        todo.append(i)  # never started: not an attempt
                        respawn(w, "died while idle")
                        continue
                    w.task, w.deadline = i, now + self.timeout_s  # only once it was sent
            waits = [w.deadline - now for w in self._workers if w.task is not None]
            waits += [w.started + self.startup_timeout_s - now for w in self._workers if not w.ready]
            timeout = max(0.0, min(waits)) if waits else None
            for conn in wait([w.conn for w in self._workers], timeout=timeout):
                w = next((x for x in self._workers if x.conn is conn), None)
                if w is None:
                    continue
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    slot = self._workers.index(w)
                    if not w.ready:
                        self._startup_failures[slot] += 1
                        if self._startup_failures[slot] >= MAX_STARTUP_FAILURES:
                            raise RuntimeError(f"math-verify worker died on start-up {MAX_STARTUP_FAILURES} times "
                                               f"in a row (last exit code {w.proc.exitcode}): check math-verify "
                                               "and the memory limit") from None
                        respawn(w, "died on start-up")
                        continue
                    i = w.task
                    respawn(w, "died" if i is None else f"died on answer {i}")
                    if i is not None:
                        tried[i] += 1
                        if tried[i] < 2:
                            counts["retries"] += 1
                            todo.append(i)  # next in line, on a fresh worker
                        else:
                            counts["crashes"] += 1
                            log.warning("math-verify died twice on answer %d; reward 0", i)
                            done += 1
                    continue
                if msg == _READY:
                    w.ready = True
                    self._startup_failures[self._workers.index(w)] = 0
                    continue
                i, reward, err = msg
                rewards[i] = reward
                if err is not None:
                    counts["errors"] += 1
                    log.debug("math-verify error on answer %d: %s", i, err)
                w.task = None
                done += 1
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    counts["timeouts"] += 1
                    log.warning("math-verify exceeded %.1fs on answer %d; worker killed, reward 0",
                                self.timeout_s, w.task)
                    done += 1
                    self._replace(w)
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    raise RuntimeError(f"math-verify worker not ready after {self.startup_timeout_s}s")
        for k, v in counts.items():
            self.totals[k] += v
        self.totals["scored"] += n
        stats = {"reward/mean": sum(rewards) / max(n, 1), "reward/time_s": time.monotonic() - t0}
        stats.update({f"reward/{k}": float(v) for k, v in counts.items()})
        return rewards, stats

    def close(self) -> None:
        self._finalizer()
        self._workers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
