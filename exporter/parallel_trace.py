"""Trace an export's graph roles in several processes at once (issue 12: export speed).

Tracing (torch.export capture, decompositions, FX -> ONNX, the onnxscript optimizer) is pure Python,
one core per process, and each role is traced independently of the others. So before the export
loop of exporter/export.py writes the graphs in the contract's order, the roles are traced by this
process and `jobs - 1` worker processes together:

    plan_jobs            how many processes: `jobs` asked for, else min(usable CPUs, roles that miss
                         the trace cache, MAX_JOBS); 1 (the sequential loop, nothing here runs) for
                         models over MAX_PARALLEL_BYTES of parameters or without room for them in /dev/shm
    traced_in_parallel   a context manager: spawns the workers (spawn context; torch.multiprocessing
                         moves the model's CPU tensors into shared memory once, the workers map the
                         same pages), then every process claims the next role, longest first
                         (ROLE_COST), from one shared counter until none is left; this process traces
                         too. Each role runs `trace.trace_graph` (the trace cache read and written as in
                         the sequential path). A worker writes its optimized graph without the model's
                         weights to a scratch directory (inside the export's staging directory); this
                         process re-binds them by name to its own tensors (`decode_traced`)
    Traced.take(role)    the export loop's graph for `role` (None: trace it in the loop), in the
                         loop's own order, so graphs, weights.data and the manifest are the
                         sequential export's byte for byte (tests/test_parallel_trace.py)

Failures. An ExportError of a trace (in a worker or here) is raised by `take` at that role, so the
export fails with the one-line error the sequential loop gives; no further roles are claimed after
one. A worker that crashes, dies or cannot start is a warning, and the roles it had not delivered are
traced in the loop. Ctrl-C: the workers ignore SIGINT (this process stops them: SIGTERM, which they
turn into SystemExit so that staged files are removed; SIGKILL after a grace period); a worker whose
parent dies gets SIGTERM from the kernel (Linux PR_SET_PDEATHSIG). Trace-cache entries are written
atomically by trace_cache, results into the scratch directory, which is removed at the end (or, after
a SIGKILL, with the export's stale staging directory by the next export).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

log = logging.getLogger("armt.export")

MAX_JOBS = 4  # default cap: more processes than this gave nothing on the 5 graphs of an export
MAX_PARALLEL_BYTES = 512 << 20  # parameters above this are traced sequentially (see plan_jobs)
SHM_DIR = "/dev/shm"
JOBS_ENV = "ARMT_TRACE_JOBS"  # the default of `jobs` when set (requested_jobs)
GRACE_S = 5.0  # SIGTERM -> SIGKILL
RESULT_MAGIC = b"ARMT-TRACED-1\n"

# Relative trace cost of each role, to claim the longest first (seconds for the official LLaMA fixture,
# fp32, in a default export with layer-once tracing (exporter/layered.py) and one op registry per
# process: segment 9.0-9.5 and memory_write 8.2-9.0 (each the first trace of its process, imports
# included), diagonal_step 6.6-7.3, decode 5.6-5.9, lm_head 0.3; causal twins and RMT roles as their
# ARMT counterparts, the RMT ones traced whole). Only the order matters: with two processes the
# parent (which starts ~1.7 s before its worker is ready) takes segment, then diagonal_step.
ROLE_COST = {"segment": 9.0, "segment_causal": 9.0, "rmt_segment": 12.0, "rmt_segment_causal": 12.0,
             "memory_write": 8.5, "rmt_memory_write": 10.0, "diagonal_step": 6.5, "diagonal_step_causal": 6.5,
             "decode": 6.0, "rmt_decode": 9.0, "lm_head": 0.3}
DEFAULT_COST = 5.0


# ------------------------------------------------------------------------------------------ planning
def check_jobs(jobs: object) -> int | None:
    """`jobs` as given to export_model / `armt export --jobs`: None (the default) or an int >= 1
    (a decimal string is accepted); anything else is an InputError (one line, exit 2)."""
    from graphs.errors import InputError
    if jobs is None:
        return None
    if isinstance(jobs, str):
        text = jobs.strip()
        if not text.isdigit():
            raise InputError(f"--jobs must be a positive integer, got {jobs!r}")
        jobs = int(text)
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise InputError(f"jobs must be a positive integer, got {jobs!r}")
    if jobs < 1:
        raise InputError(f"--jobs must be a positive integer, got {jobs}")
    return jobs


def requested_jobs(jobs: object) -> int | None:
    """check_jobs(jobs), and for None the environment's ARMT_TRACE_JOBS if set (a test suite or a
    shared machine can pin the default; same validation, naming the variable)."""
    from graphs.errors import InputError
    if jobs is not None:
        return check_jobs(jobs)
    text = os.environ.get(JOBS_ENV, "").strip()
    if not text:
        return None
    try:
        return check_jobs(text)
    except InputError:
        raise InputError(f"{JOBS_ENV} must be a positive integer, got {text!r}") from None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Free bytes of the shared-memory filesystem torch.multiprocessing puts tensors in (None: unknown)."""
    try:
        st = os.statvfs(path)
    except (AttributeError, OSError):
        return None
    return st.f_bavail * st.f_frsize


@dataclass(frozen=True)
class JobsPlan:
    jobs: int  # processes that trace (1: the sequential loop alone)
    reason: str  # why, for the log


def plan_jobs(requested: int | None, to_trace: int, param_bytes: int, cpus: int,
              shm_free: int | None, on_cpu: bool = True) -> JobsPlan:
    """How many processes trace `to_trace` roles (those that miss the trace cache) of a model with
    `param_bytes` of parameters and buffers. `requested` None: min(cpus, to_trace, MAX_JOBS); an
    explicit number is capped at to_trace only. Always 1 when asked, when at most one role needs
    tracing, when the parameters exceed MAX_PARALLEL_BYTES (every worker maps the tensors' pages and
    holds its own torch + tracing working set; a 1B model must not spawn extra copies of itself),
    when /dev/shm has no room for twice the parameters, or when the tensors are not all in CPU
    memory (`on_cpu` False: a worker would open the GPU too)."""
    requested = check_jobs(requested)
    if requested == 1:
        return JobsPlan(1, "one process asked for")
    if to_trace <= 1:
        return JobsPlan(1, f"{to_trace} graph{'s' if to_trace != 1 else ''} to trace")
    if not on_cpu:
        return JobsPlan(1, "the model's tensors are not all in CPU memory")
    if param_bytes > MAX_PARALLEL_BYTES:
        return JobsPlan(1, f"the parameters ({param_bytes / 2**20:.0f} MiB) exceed the parallel-trace limit "
                           f"({MAX_PARALLEL_BYTES / 2**20:.0f} MiB)")
    if shm_free is not None and shm_free < 2 * param_bytes:
        return JobsPlan(1, f"{SHM_DIR} has {shm_free / 2**20:.0f} MiB free, the parameters need "
                           f"{param_bytes / 2**20:.0f} MiB there")
    n = min(requested if requested is not None else min(cpus, MAX_JOBS), to_trace)
    if n <= 1:
        return JobsPlan(1, f"{cpus} CPU{'s' if cpus != 1 else ''} usable")
    return JobsPlan(n, f"{to_trace} graphs to trace, {cpus} CPU{'s' if cpus != 1 else ''} usable")


def claim_order(roles: Sequence[str]) -> list[str]:
    """`roles` longest first (ROLE_COST; ties keep the given order)."""
    return sorted(roles, key=lambda r: -ROLE_COST.get(r, DEFAULT_COST))


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (what shared memory would hold)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def roles_to_trace(model, roles: Sequence[str], precision: str, opset: int, cache: bool | None) -> list[str]:
    """The roles without a trace-cache entry (every role when the cache is off for this export)."""
    from exporter import trace_cache
    from exporter.trace import cell_module, fused_attention
    if not (trace_cache.enabled() if cache is None else cache):
        return list(roles)
    store = trace_cache.TraceCache()
    out = []
    for role in roles:
        module = cell_module(model, role, precision, opset)
        key = trace_cache.trace_key(model, role, precision, opset, fused_attention(precision, opset), module)
        if not store.path(key).is_file():
            out.append(role)
    return out


# ---------------------------------------------------------------------- the result of a worker's trace
def encode_traced(model, tensors: dict) -> bytes:
    """A traced (optimized, renamed) onnx_ir Model as bytes, without the data of initializers that
    are `tensors` (the cell's parameters and buffers, by name and the very same memory): those are
    re-bound by `decode_traced`. Everything else (the optimizer's folded constants) is kept inline."""
    from exporter import trace_cache
    weights = []
    for name, value in model.graph.initializers.items():
        t, tensor = tensors.get(name), value.const_value
        raw = getattr(tensor, "raw", None)
        if (t is None or tensor is None or not hasattr(raw, "data_ptr") or raw.data_ptr() != t.data_ptr()
                or tuple(raw.shape) != tuple(t.shape) or raw.stride() != t.stride() or raw.dtype != t.dtype):
            continue
        weights.append(name)
    return trace_cache.frame(RESULT_MAGIC, trace_cache.serialize_unbound(model, weights))


def decode_traced(blob: bytes, tensors: dict, role: str):
    """The onnx_ir Model of `encode_traced` with its weights bound to `tensors` (this process's cell
    tensors, shared, as a trace here binds them). A damaged or mismatched result: ExportError."""
    import onnx
    import onnx_ir as ir

    from exporter import trace_cache
    from graphs.errors import ExportError
    try:
        payload = trace_cache.unframe(RESULT_MAGIC, blob)
    except ValueError:
        raise ExportError(f"the {role} graph traced by a worker process is damaged") from None
    model = ir.serde.deserialize_model(onnx.ModelProto.FromString(payload))
    bound = json.loads(model.metadata_props.pop(trace_cache.BOUND_PROP, "{}"))
    try:
        trace_cache.bind_weights(model, bound, tensors)
    except trace_cache.WeightMismatch as exc:
        raise ExportError(f"the {role} graph traced by a worker process does not fit this model's "
                          f"tensor {exc.name}") from None
    return model


# ------------------------------------------------------------------------------------------ workers
@dataclass
class _Worker:
    index: int
    process: object  # multiprocessing Process
    conn: object  # this end of its Pipe
    started: float = 0.0  # time.time() at start()
    current: str | None = None  # the role it is tracing
    finished: bool = False
    peak_rss_mb: float | None = None


def _claim(counter, order: Sequence[str]) -> str | None:
    """The next role of `order` nobody has claimed (None: all claimed or stopped: counter < 0)."""
    with counter.get_lock():
        i = counter.value
        if i < 0 or i >= len(order):
            return None
        counter.value = i + 1
    return order[i]


def _stop_claims(counter) -> None:
    with counter.get_lock():
        counter.value = -1


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM from the kernel when the parent dies (Linux); exit now if it is already gone."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _on_sigterm(signum, frame):  # staged files of an interrupted write are removed by their finally blocks
    raise SystemExit(128 + signum)


def _worker_main(index: int, payload: bytes, order: list[str], counter, precision: str, opset: int,
                 cache: bool | None, out_dir: str, conn, parent_pid: int) -> None:
    """A worker process: unpickle the model (`payload`: its tensors are shared-memory handles), claim
    roles, trace each (trace_graph, trace cache included), write the result into out_dir, report on
    `conn`: ("ready", time), ("start", role), ("done", role, seconds, file), ("error", role, one
    line) for an ExportError, ("crash", role or None, one line) for anything else, ("exit", peak RSS
    MB, CPU seconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent around start()
    _die_with_parent(parent_pid)
    # no logging set-up here (library code configures no logger): the worker's info lines are the
    # parent's to log (_drain); its warnings reach stderr through logging's last-resort handler
    try:
        try:
            import pickle

            from exporter import trace_cache
            from exporter.trace import cell_module, trace_graph
            from graphs.atomic import atomic_write_bytes
            from graphs.errors import ExportError
            model = pickle.loads(payload)
        except Exception as exc:  # e.g. a model class this process cannot import
            conn.send(("crash", None, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            return
        conn.send(("ready", time.time()))
        while (role := _claim(counter, order)) is not None:
            conn.send(("start", role))
            t0 = time.perf_counter()
            try:
                traced = trace_graph(model, role, precision, opset, cache=cache)
                blob = encode_traced(traced, trace_cache.cell_tensors(cell_module(model, role, precision, opset)))
                path = Path(out_dir) / f"{role}.traced"
                atomic_write_bytes(path, blob)
            except ExportError as exc:
                conn.send(("error", role, str(exc)))
                break
            except Exception as exc:  # a bug or a resource problem: the parent traces the role itself
                conn.send(("crash", role, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
                break
            conn.send(("done", role, time.perf_counter() - t0, str(path)))
    finally:
        try:
            import resource
            use = resource.getrusage(resource.RUSAGE_SELF)
            rss, cpu = use.ru_maxrss / 1024, use.ru_utime + use.ru_stime  # Linux: ru_maxrss in KiB
        except ImportError:
            rss = cpu = None
        with contextlib.suppress(OSError, ValueError):
            conn.send(("exit", rss, cpu))


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start a spawn child without the parent's __main__ script: spawn would run that script again
    in the child (a script without an `if __name__ == "__main__"` guard would export again there).
    The worker's target lives in this module; a model class defined in __main__ then fails to
    unpickle in the worker, which is reported and leaves the tracing to the other processes."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    had_file, file_ = hasattr(main, "__file__"), getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    try:
        main.__spec__ = None
        if had_file:
            del main.__file__
        yield
    finally:
        main.__spec__ = spec
        if had_file:
            main.__file__ = file_


# ------------------------------------------------------------------------------------- the coordinator
@dataclass
class Traced:
    """What the export loop takes: the graphs traced before it, the errors, the roles left to it."""

    model: object
    precision: str
    opset: int
    graphs: dict[str, object] = field(default_factory=dict)  # role -> onnx_ir Model (traced here)
    files: dict[str, Path] = field(default_factory=dict)  # role -> a worker's result file
    errors: dict[str, str] = field(default_factory=dict)  # role -> the ExportError's line

    def take(self, role: str):
        """The traced graph of `role` (None: not traced; the loop traces it). Raises the role's
        ExportError where its trace failed."""
        from graphs.errors import ExportError
        if role in self.errors:
            raise ExportError(self.errors.pop(role))
        if role in self.graphs:
            return self.graphs.pop(role)
        path = self.files.pop(role, None)
        if path is None:
            return None
        from exporter import trace_cache
        from exporter.trace import cell_module
        tensors = trace_cache.cell_tensors(cell_module(self.model, role, self.precision, self.opset))
        return decode_traced(path.read_bytes(), tensors, role)


def _nothing(model, precision: str, opset: int) -> Traced:
    return Traced(model, precision, opset)


@contextlib.contextmanager
def traced_in_parallel(model, roles: Sequence[str], precision: str, opset: int, cache: bool | None,
                       jobs: int | None, describe: Callable[[str], None] | None = None,
                       scratch: Path | None = None, trace: Callable | None = None) -> Iterator[Traced]:
    """Trace `roles` of `model` (cast to the precision) across processes before the export loop
    (module docstring); yields the Traced the loop takes its graphs from. jobs: plan_jobs's
    `requested` (1: yields an empty Traced at once, the loop traces everything). scratch: the
    directory to create for the workers' results (removed at the end; the export passes one inside
    its staging directory, so a killed export's leftovers go with it; None: a temporary directory).
    trace: the function this process traces with (the export loop's; None: trace.trace_graph; the
    workers always run trace.trace_graph)."""
    jobs = requested_jobs(jobs)
    if jobs == 1 or len(roles) <= 1:
        yield _nothing(model, precision, opset)
        return
    misses = roles_to_trace(model, roles, precision, opset, cache)
    on_cpu = all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    plan = plan_jobs(jobs, len(misses), model_bytes(model) if on_cpu else 0, usable_cpus(), shm_free_bytes(), on_cpu)
    if plan.jobs <= 1:
        log.info("tracing sequentially: %s", plan.reason)
        yield _nothing(model, precision, opset)
        return
    log.info("tracing %d graphs in %d processes (%s)", len(misses), plan.jobs, plan.reason)
    traced = Traced(model, precision, opset)
    if scratch is None:
        out_dir = Path(tempfile.mkdtemp(prefix="armt-traces-"))
    else:
        out_dir = Path(scratch)
        out_dir.mkdir()
    workers: list[_Worker] = []
    try:
        _run(model, claim_order(misses), precision, opset, cache, plan.jobs - 1, out_dir, traced, workers,
             describe, trace)
        yield traced
    finally:
        _stop(workers)
        shutil.rmtree(out_dir, ignore_errors=True)


def _run(model, order: list[str], precision: str, opset: int, cache: bool | None, n_workers: int, out_dir: Path,
         traced: Traced, workers: list[_Worker], describe, trace) -> None:
    import torch.multiprocessing as tmp  # registers the shared-memory reductions of tensors

    from exporter.trace import trace_graph
    trace_graph = trace or trace_graph
    from graphs.errors import ExportError
    from multiprocessing.reduction import ForkingPickler  # torch.multiprocessing registered its tensor reductions
    ctx = tmp.get_context("spawn")  # a fresh interpreter: no fork of torch's threads
    counter = ctx.Value("i", 0)
    masks = hasattr(signal, "pthread_sigmask")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if masks else None  # children inherit it
    try:
        for i in range(n_workers):
            try:  # the tensors move into shared memory (once); the pickle holds handles, each usable once
                payload = bytes(ForkingPickler.dumps(model))
            except Exception as exc:  # an unpicklable model: this process traces alone
                log.warning("cannot hand the model to a trace worker (%s: %s); tracing in this process",
                            exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else "")
                break
            here, there = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, name=f"armt-trace-{i + 1}", daemon=True,
                            args=(i + 1, payload, order, counter, precision, opset, cache, str(out_dir), there,
                                  os.getpid()))
            started = time.time()
            try:
                with _main_hidden():
                    p.start()
            except Exception as exc:  # cannot spawn or pickle the model: the others (or the loop) trace
                log.warning("cannot start a trace worker (%s: %s); tracing with fewer processes",
                            exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else "")
                here.close()
                there.close()
                break
            there.close()
            workers.append(_Worker(i + 1, p, here, started))
    finally:
        if masks:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    while (role := _claim(counter, order)) is not None:  # this process traces too
        if describe is not None:
            describe(role)
        try:
            traced.graphs[role] = trace_graph(model, role, precision, opset, cache=cache)
        except ExportError as exc:
            traced.errors[role] = str(exc)
            _stop_claims(counter)
        _poll(workers, traced, counter, block=False)
    while any(not w.finished for w in workers):
        _poll(workers, traced, counter, block=True)


def _poll(workers: list[_Worker], traced: Traced, counter, block: bool) -> None:
    """Handle the workers' messages (block: wait for at least one event: a message or an exit)."""
    from multiprocessing.connection import wait
    live = [w for w in workers if not w.finished]
    if not live:
        return
    ready = wait([w.conn for w in live] + [w.process.sentinel for w in live], timeout=None if block else 0)
    for w in live:
        if w.conn in ready or w.process.sentinel in ready:
            _drain(w, traced, counter)


def _drain(w: _Worker, traced: Traced, counter) -> None:
    while True:
        try:
            if not w.conn.poll():
                break
            msg = w.conn.recv()
        except (EOFError, OSError):
            break
        kind = msg[0]
        if kind == "ready":  # imported and unpickled
            log.info("trace worker %d ready %.1f s after its start", w.index, msg[1] - w.started)
        elif kind == "start":
            w.current = msg[1]
        elif kind == "done":
            traced.files[msg[1]] = Path(msg[3])
            w.current = None
            log.info("traced %s graph in %.1f s (worker process %d)", msg[1], msg[2], w.index)
        elif kind == "error":
            traced.errors[msg[1]] = msg[2]
            w.current = None
            _stop_claims(counter)
        elif kind == "crash":
            log.warning("trace worker %d failed%s (%s); %s", w.index, f" on the {msg[1]} graph" if msg[1] else "",
                        msg[2], "tracing it here" if msg[1] else "the other processes trace its share")
            w.current = None
        elif kind == "exit":
            w.peak_rss_mb = msg[1]
            if msg[1] is not None:
                log.info("trace worker %d: peak RSS %.0f MB, %.1f s CPU", w.index, msg[1], msg[2])
            w.finished = True
            return
    if not w.finished and not w.process.is_alive():
        w.process.join()
        if w.current is not None:
            log.warning("trace worker %d exited (code %s) while tracing the %s graph; tracing it here", w.index,
                        w.process.exitcode, w.current)
        else:
            log.info("trace worker %d exited (code %s)", w.index, w.process.exitcode)
        w.current = None
        w.finished = True


def _stop(workers: list[_Worker]) -> None:
    """Stop every worker still running (SIGTERM, then SIGKILL after GRACE_S) and reap them."""
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
    deadline = time.monotonic() + GRACE_S
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        with contextlib.suppress(OSError):
            w.conn.close()
