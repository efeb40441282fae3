"""Shared machinery for the benches: the system header, memory-capped contender subprocesses,
the interpreter's idle footprint, the O_DIRECT disk bandwidth, I/O counters, random bf16
checkpoints, a greedy decode timer, a table printer and JSON output.

A memory-limited machine is simulated honestly: a capped contender runs in a fresh memory cgroup
(``../shared/tools/memlimit.sh BYTES CMD...``, relative to the repository root) whose limit is
the budget plus the interpreter's idle footprint, so the page cache counts against it too. The
page cache is dropped once before each capped contender so no contender inherits warm pages.
Where cgroups are unavailable (not root, no cgroup v1 memory controller) the contenders run
uncapped and every row says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MEMLIMIT = (REPO_ROOT / ".." / "shared" / "tools" / "memlimit.sh").resolve()
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
RESULT_TAG = "BENCH_RESULT "
BLOCK = 4096
CHUNK = 8 << 20

_MEMLIMIT_RE = re.compile(r"memlimit: limit=(\d+) max_usage=(\d+) failcnt=(\d+)")


# -- sizes ---------------------------------------------------------------------------------------
def fmt_bytes(n: float | int | None) -> str:
    """Decimal units (matches offload's format_bytes)."""
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(v) < 1000 or unit == "TB":
            return f"{v:.0f} {unit}" if unit in ("B", "KB", "MB") else f"{v:.2f} {unit}"
        v /= 1000
    return f"{v:.2f} TB"


# -- the system header ---------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mount_of(path: Path) -> tuple[str, str]:
    """(device, fstype) of the filesystem holding ``path``."""
    best, dev, fstype = "", "?", "?"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, dev, fstype = mnt, parts[0], parts[2]
    except OSError:
        pass
    return dev, fstype


def _rotational(dev: str) -> str:
    name = Path(dev).name
    p = Path("/sys/block") / name / "queue" / "rotational"
    if p.exists():
        return "rotational" if p.read_text().strip() == "1" else "non-rotational"
    return "?"


def _commit() -> str:
    """The commit the bench runs on (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "offload", "csrc", "benches"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def system_info(work_dir: Path) -> dict:
    import torch

    info: dict = {
        "commit": _commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        from offload.kernels import cpu

        info["kernel_isa"], info["kernel_isas"] = cpu.selected(), list(cpu.supported())
    except Exception as e:   # no compiler, or a bad $OFFLOAD_CPU_ISA: say so in the header
        info["kernel_isa"], info["kernel_isas"] = f"unavailable ({e})", []
    for mod in ("transformers", "accelerate", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # optional in a minimal environment
            info[mod] = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        info["ram_bytes"], info["ram_available_bytes"] = vm.total, vm.available
        info["swap_bytes"] = psutil.swap_memory().total
    except Exception:
        info["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    work_dir.mkdir(parents=True, exist_ok=True)
    dev, fstype = _mount_of(work_dir)
    info["disk"] = {"work_dir": str(work_dir), "device": dev, "fstype": fstype,
                    "kind": _rotational(dev), "free_bytes": shutil.disk_usage(work_dir).free}
    return info


def format_header(info: dict, extra: list[tuple[str, str]] = ()) -> str:
    d = info["disk"]
    rows = [
        ("machine", f"{info['cpu']} x{info['cpu_count']} (torch threads {info['torch_threads']}),"
                    f" RAM {fmt_bytes(info.get('ram_bytes'))}, swap "
                    f"{fmt_bytes(info.get('swap_bytes', 0))}, CUDA {info['cuda']}"),
        ("commit", info.get("commit", "unknown")),
        ("software", f"python {info['python']}, torch {info['torch']}, transformers "
                     f"{info.get('transformers')}, accelerate {info.get('accelerate')}"),
        ("cpu paths", f"offload kernels {info.get('kernel_isa')} (this CPU runs "
                      f"{', '.join(info.get('kernel_isas') or ['none'])}; $OFFLOAD_CPU_ISA), "
                      f"torch {info.get('torch_cpu_capability')}"),
        ("disk", f"{d['device']} ({d['fstype']}, {d['kind']}) for {d['work_dir']}, "
                 f"{fmt_bytes(d['free_bytes'])} free"),
        *extra,
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)} : {v}" for k, v in rows)


# -- memory caps ---------------------------------------------------------------------------------
def cgroup_status() -> tuple[bool, str]:
    """Whether memlimit.sh can cap a contender here, and if not, why."""
    if not MEMLIMIT.is_file():
        return False, f"{MEMLIMIT} is missing"
    if os.geteuid() != 0:
        return False, "not root (memlimit.sh creates a cgroup)"
    if not (CGROUP_MEMORY / "memory.limit_in_bytes").exists():
        return False, f"no cgroup v1 memory controller at {CGROUP_MEMORY}"
    if not os.access(CGROUP_MEMORY, os.W_OK):
        return False, f"{CGROUP_MEMORY} is not writable"
    try:
        r = subprocess.run(["bash", str(MEMLIMIT), str(256 << 20), "true"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"memlimit.sh failed: {e}"
    if r.returncode != 0 or not _MEMLIMIT_RE.search(r.stderr):
        return False, f"memlimit.sh failed (rc {r.returncode}): {r.stderr.strip()[-200:]}"
    return True, f"memory cgroup v1 via {MEMLIMIT}"


def drop_page_cache() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; False where not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def idle_footprint(imports: str | None = None) -> int:
    """VmRSS of a fresh interpreter after ``imports``: what every contender pays before any
    weights, and what the cap adds to the budget."""
    code = (f"{imports or DEFAULT_IDLE_IMPORTS}\nimport gc; gc.collect()\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')][0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"measuring the idle footprint failed: {r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1]) * 1024


def idle_footprint_cgroup(imports: str | None = None) -> int | None:
    """The same idle interpreter as the cgroup accounts it (anon + page cache it pulled in),
    after dropping the page cache; None where memlimit.sh cannot run. Reported for reference:
    it counts reclaimable page cache of the imported sources, so the cap uses the RSS."""
    drop_page_cache()
    r = subprocess.run(["bash", str(MEMLIMIT), str(64 << 30), sys.executable, "-c",
                        imports or DEFAULT_IDLE_IMPORTS],
                       capture_output=True, text=True, timeout=300)
    m = _MEMLIMIT_RE.search(r.stderr)
    return int(m.group(2)) if (m and r.returncode == 0) else None


def device_reads(path: str | os.PathLike) -> tuple[int, int] | None:
    """(read requests completed, bytes read) so far on the block device holding ``path``
    (/proc/diskstats; the whole disk when ``path`` is on a partition); None if unknown."""
    try:
        dev = os.stat(path).st_dev
        major, minor = os.major(dev), os.minor(dev)
        sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
        if (sys_dev / "partition").exists():
            major, minor = map(int, (sys_dev.resolve().parent / "dev").read_text().split(":"))
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if int(f[0]) == major and int(f[1]) == minor:
                return int(f[3]), int(f[5]) * 512
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_io() -> dict[str, int] | None:
    """This process's I/O counters (/proc/self/io, every thread): ``read_bytes`` is what it had
    the block layer fetch (page-cache misses, mmap faults and O_DIRECT alike), ``rchar`` what its
    read calls returned; None where the file is unreadable."""
    try:
        out = {}
        for line in Path("/proc/self/io").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
        return out
    except (OSError, ValueError):
        return None


# -- disk bandwidth ------------------------------------------------------------------------------
def disk_bandwidth(path: Path, chunk: int = CHUNK, max_bytes: int | None = None) -> dict:
    """Sequential read bandwidth of ``path`` with O_DIRECT (page cache bypassed) in ``chunk``
    reads into one 4096-aligned buffer. Falls back to buffered reads after dropping the cache
    where O_DIRECT is refused, and says so."""
    import mmap

    size = os.path.getsize(path) // BLOCK * BLOCK
    length = size if max_bytes is None else min(size, max_bytes // BLOCK * BLOCK)
    buf = mmap.mmap(-1, chunk)            # anonymous mmap: page-aligned
    direct = True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        direct = False
        drop_page_cache()
        fd = os.open(path, os.O_RDONLY)
    done = 0
    mv = memoryview(buf)
    try:
        t0 = time.perf_counter()
        while done < length:
            n = min(chunk, length - done)
            got = os.preadv(fd, [mv[:n]], done)
            if got <= 0:
                break
            done += got
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        mv.release()
        buf.close()
    return {"bytes": done, "seconds": elapsed, "bps": done / max(elapsed, 1e-9),
            "direct": direct, "chunk": chunk, "path": str(path)}


# -- random checkpoints -------------------------------------------------------------------------
def save_random_checkpoint(model_dir: Path, config, model_cls, want: dict, seed: int = 0) -> dict:
    """A random-init bf16 checkpoint of ``model_cls(config)`` (config.json + model.safetensors)
    at ``model_dir``, reused when its marker (``bench_model.json``) records the same ``want``.
    Every tensor of the state dict is N(0, 0.02) (norm weights 1), drawn per tensor with a
    seeded generator; the model itself is only ever built on the meta device. Written to a
    ``.partial`` sibling and renamed, so an interrupted build is never reused."""
    import torch
    from safetensors.torch import save_file

    marker = model_dir / "bench_model.json"
    if marker.exists() and (model_dir / "model.safetensors").exists():
        try:
            info = json.loads(marker.read_text())
            if info.get("want") == want:
                return info
        except ValueError:
            pass
    t0 = time.perf_counter()
    with torch.device("meta"):
        meta = model_cls(config)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in meta.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(p.shape, generator=g, dtype=torch.float32)
            state[name] = t.mul_(0.02).to(torch.bfloat16)
            del t
    tmp = model_dir.with_name(model_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    info = {"want": want, "weight_bytes": sum(t.numel() * t.element_size() for t in state.values()),
            "params": sum(t.numel() for t in state.values()),
            "tensors": {k: list(t.shape) for k, t in state.items()},
            "build_seconds": time.perf_counter() - t0}
    (tmp / "bench_model.json").write_text(json.dumps(info, indent=1))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    return info


def device_map_summary(model) -> dict:
    """``{device: {"modules": n, "bytes": b}}`` of an Accelerate-dispatched model's
    ``hf_device_map`` (bytes: the parameters each device holds)."""
    dmap = getattr(model, "hf_device_map", None) or {}
    keys = sorted(dmap, key=len, reverse=True)
    out: dict[str, dict] = {}
    for name, p in model.named_parameters():
        dev = next((str(dmap[k]) for k in keys if k == "" or name == k
                    or name.startswith(k + ".")), "cpu")
        out.setdefault(dev, {"modules": 0, "bytes": 0})["bytes"] += p.numel() * p.element_size()
    for dev in dmap.values():
        out.setdefault(str(dev), {"modules": 0, "bytes": 0})["modules"] += 1
    return out


# -- contenders ----------------------------------------------------------------------------------
@dataclass
class ContenderRun:
    """What one contender subprocess produced."""

    name: str
    cmd: list[str]
    returncode: int
    seconds: float
    capped: bool
    cap_bytes: int | None
    results: list[dict] = field(default_factory=list)
    memlimit: dict | None = None
    log_tail: str = ""
    dropped_cache: bool = False
    foreign_cpu: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.results)

    @property
    def killed(self) -> bool:
        return self.returncode in (-9, 137) or bool(self.memlimit and self.returncode != 0
                                                     and self.memlimit.get("failcnt"))

    def to_json(self) -> dict:
        return {"name": self.name, "cmd": self.cmd, "returncode": self.returncode,
                "seconds": self.seconds, "capped": self.capped, "cap_bytes": self.cap_bytes,
                "dropped_cache": self.dropped_cache, "memlimit": self.memlimit,
                "foreign_cpu": self.foreign_cpu,
                "results": self.results, "log_tail": self.log_tail if not self.ok else ""}


def run_contender(name: str, argv: list[str], *, cap_bytes: int | None = None,
                  drop_cache: bool = False, timeout: float = 3600, echo: bool = True,
                  prefix: str | None = None) -> ContenderRun:
    """Run ``python argv...`` in its own process, under memlimit.sh at ``cap_bytes`` if given.

    The child prints ``BENCH_RESULT {json}`` lines; its output is echoed to our stderr with a
    prefix as it arrives (a slow contender shows progress) and kept for parsing.
    """
    cmd = [sys.executable, *argv]
    if cap_bytes is not None:
        cmd = ["bash", str(MEMLIMIT), str(int(cap_bytes)), *cmd]
    dropped = drop_page_cache() if drop_cache else False
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tag = prefix or f"[{name}]"
    lines: list[str] = []
    busy0, kids0 = _busy_cpu_seconds(), _children_cpu_seconds()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, bufsize=1, cwd=str(REPO_ROOT))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if echo and not line.startswith(RESULT_TAG):
                print(f"  {tag} {line.rstrip()}", file=sys.stderr, flush=True)
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                lines.append(f"bench: killed after {timeout:.0f} s (timeout)")
                break
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    seconds = time.perf_counter() - t0
    foreign = None
    if busy0 is not None:
        busy = _busy_cpu_seconds() - busy0
        own = _children_cpu_seconds() - kids0
        foreign = max(0.0, busy - own) / max(seconds * (os.cpu_count() or 1), 1e-9)
    results, mem = [], None
    for line in lines:
        if line.startswith(RESULT_TAG):
            results.append(json.loads(line[len(RESULT_TAG):]))
        m = _MEMLIMIT_RE.search(line)
        if m:
            mem = {"limit": int(m.group(1)), "max_usage": int(m.group(2)),
                   "failcnt": int(m.group(3))}
    tail = "\n".join(l for l in lines if not l.startswith(RESULT_TAG))[-4000:]
    return ContenderRun(name, cmd, rc, seconds, cap_bytes is not None, cap_bytes, results, mem,
                        tail, dropped, foreign)


def failure_reason(run: ContenderRun) -> str:
    """One line saying why a contender produced no result: SIGKILLed (at the cap, as a rule), a
    timeout, the last exception line of its output, or its return code. An exception wins
    over a nonzero ``failcnt``: a cgroup hits its limit whenever the page cache fills it."""
    lines = [l.strip() for l in run.log_tail.splitlines() if l.strip()]
    if any("(timeout)" in l for l in lines[-3:]):
        return "timed out"
    if run.returncode in (-9, 137):
        return "killed (SIGKILL)" + (" at the memory cap (OOM)" if run.capped else "")
    if run.returncode in (-4, 132) or any("Illegal instruction" in l for l in lines[-3:]):
        return "crashed: illegal instruction (SIGILL; an instruction this CPU or VM refuses)"
    err = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b:?")
    for line in reversed(lines):
        if err.match(line):
            return f"rc {run.returncode}: {line[:160]}"
    if run.killed:
        return "killed at the memory cap (OOM)"
    return f"rc {run.returncode}" + (": no result line" if run.returncode == 0 else "")


def launch_contender(key: str, argv: list[str], *, cap_bytes: int | None, wait_quiet: float,
                     timeout: float, quiet: bool) -> ContenderRun:
    """Wait for a quiet machine, run one contender (capped when ``cap_bytes``, after dropping
    the page cache), and say on stderr what runs and, if it failed, why."""
    waited = wait_for_quiet(wait_quiet)
    print(f"running {key} ({'cap ' + fmt_bytes(cap_bytes) if cap_bytes else 'uncapped'})"
          + (f" after waiting {waited:.0f} s for a quiet machine" if waited >= 5 else "")
          + " ...", file=sys.stderr, flush=True)
    r = run_contender(key, argv, cap_bytes=cap_bytes, drop_cache=cap_bytes is not None,
                      timeout=timeout, echo=not quiet)
    if not r.ok:
        print(f"  {key} FAILED ({failure_reason(r)}); last output:\n{r.log_tail[-1500:]}",
              file=sys.stderr, flush=True)
    return r


def wait_for_quiet(max_wait: float, *, threshold: float = 0.15, settle: float = 3.0) -> float:
    """Wait up to ``max_wait`` s until other processes use under ``threshold`` of the CPUs for
    ``settle`` s in a row (a shared machine); returns the seconds waited."""
    if max_wait <= 0 or _busy_cpu_seconds() is None:
        return 0.0
    ncpu = os.cpu_count() or 1
    t0 = time.perf_counter()
    quiet = 0.0
    while time.perf_counter() - t0 < max_wait:
        b0 = _busy_cpu_seconds()
        time.sleep(1.0)
        frac = (_busy_cpu_seconds() - b0) / ncpu
        quiet = quiet + 1.0 if frac < threshold else 0.0
        if quiet >= settle:
            break
    return time.perf_counter() - t0


def _busy_cpu_seconds() -> float | None:
    """Machine-wide non-idle CPU seconds so far (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def _children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def emit_result(result: dict) -> None:
    """Called in a contender: hand one result row to the parent."""
    result.setdefault("rss_peak_bytes", peak_rss())
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)


def peak_rss() -> int:
    """This process's peak resident set (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- timing --------------------------------------------------------------------------------------
def greedy_decode(model, prompts, n_tokens: int, *, warmup_tokens: int = 1,
                  before_timed=None, last_logits_only: bool = True) -> dict:
    """Prefill ``prompts`` ([batch, len] int64), decode ``warmup_tokens`` untimed (the first
    token after prefill warms every path), then time ``n_tokens`` greedy decode steps (one
    forward each, batch tokens per step). Prefill and warm-up are reported, never timed in.
    ``before_timed()`` is called just before the timed steps (e.g. to snapshot counters).
    ``last_logits_only`` prefills with ``logits_to_keep=1`` as ``generate()`` does."""
    import inspect

    import torch

    batch = int(prompts.shape[0])
    step_s: list[float] = []
    # transformers >= 5.x names the KV cache ``cache`` (``past_key_values`` is deprecated)
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters \
        else "past_key_values"

    def step(ids, cache):
        out = model(input_ids=ids, use_cache=True, **({key: cache} if cache is not None else {}),
                    **({"logits_to_keep": 1} if cache is None and last_logits_only else {}))
        new = getattr(out, "cache", None)
        if new is None:
            new = out.past_key_values
        return out.logits[:, -1].argmax(-1, keepdim=True), new

    with torch.no_grad():
        t0 = time.perf_counter()
        nxt, cache = step(prompts, None)
        prefill_s = time.perf_counter() - t0
        tokens = [nxt]
        t0 = time.perf_counter()
        for _ in range(warmup_tokens):
            nxt, cache = step(nxt, cache)
            tokens.append(nxt)
        warmup_s = time.perf_counter() - t0
        if before_timed is not None:
            before_timed()
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            nxt, cache = step(nxt, cache)
            step_s.append(time.perf_counter() - t0)
            tokens.append(nxt)
    major_faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0
    total = sum(step_s)
    return {"batch": batch, "prompt_len": int(prompts.shape[1]), "tokens": n_tokens,
            "major_faults": major_faults,
            "prefill_s": prefill_s, "warmup_s": warmup_s, "step_s": step_s,
            "decode_s": total, "tok_s": batch * n_tokens / total if total else 0.0,
            "s_per_step": total / n_tokens if n_tokens else 0.0,
            "median_s_per_step": sorted(step_s)[len(step_s) // 2] if step_s else 0.0,
            "s_per_token": total / (batch * n_tokens) if n_tokens else 0.0,
            "generated": torch.cat(tokens, dim=1).tolist()}


# -- output --------------------------------------------------------------------------------------
def offload_decode(model, prompts, n_tokens: int, warmup: int) -> tuple[dict, dict, dict]:
    """``greedy_decode`` of an offload model (last logits only, as generate() does): its
    result, and ``offload.stats`` just before the timed steps and after them."""
    import offload

    before: dict = {}
    res = greedy_decode(model, prompts, n_tokens, warmup_tokens=warmup,
                        before_timed=lambda: before.update(offload.stats(model)),
                        last_logits_only=True)
    return res, before, offload.stats(model)


def format_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join((c.rjust(w) if i in right else c.ljust(w))
                         for i, (c, w) in enumerate(zip(r, width))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in width)]
                     + [line(r) for r in cells[1:]])


class Report:
    """What one bench run prints and writes, gathered in one object so every bench's ``main``
    reads as its steps: ``header`` (the system, the model, the cap), ``table`` (contender rows),
    ``target`` (a goal met or not, with the measured value), ``finish`` (the targets, the JSON
    with the commit, the exit status)."""

    def __init__(self, name: str, title: str, args: argparse.Namespace, info: dict):
        self.name, self.args, self.info = name, args, info
        self.targets: list[dict] = []
        self.failures: list[str] = []
        print(f"== {title} ==", flush=True)

    def header(self, rows: list[tuple[str, str]]) -> None:
        print(format_header(self.info, rows), flush=True)

    def table(self, headers: list[str], rows: list[list[str]], *, right=frozenset(),
              note: str = "") -> None:
        print("\n" + format_table(headers, rows, right=right) + (f"\n\n{note}" if note else ""),
              flush=True)

    def target(self, name: str, value: float | None, goal: float, detail: str, *,
               runs: dict, needs: tuple[str, ...] = (), at_most: bool = False) -> None:
        """A goal: PASS or SHORT by the measured ``value`` (``at_most``: lower is better); N/A
        without a value; FAIL when an offload row it needs ran and failed (its reason given)."""
        ok = value is not None and (value <= goal if at_most else value >= goal)
        status = "N/A" if value is None else ("PASS" if ok else "SHORT")
        failed = [k for k in needs if k.startswith("offload") and k in runs and not runs[k].ok]
        if value is None and failed:
            status = "FAIL"
            detail = "; ".join(f"{k}: {failure_reason(runs[k])}" for k in failed)
        elif value is None and not detail:
            detail = "missing rows: " + ", ".join(
                k for k in needs if k not in runs or not runs[k].ok)
        self.targets.append({"target": name, "value": value, "goal": goal, "status": status,
                             "detail": detail})

    def check(self, name: str, ok: bool, detail: str) -> None:
        """A yes/no check (greedy tokens equal the resident model's); a failed one fails the
        run."""
        self.targets.append({"target": name, "value": None, "goal": None,
                             "status": "PASS" if ok else "FAIL", "detail": detail})
        if not ok:
            self.failures.append(f"{name}: {detail}")

    def finish(self, runs: dict, data: dict, *, capped: bool) -> int:
        """Print the targets, write the JSON (``--json``), and return the exit status: 1 when
        a contender failed or a check did."""
        print("\ntargets" + ("" if capped else " (UNCAPPED run: not a memory-limited "
                                               "measurement)"))
        for t in self.targets:
            val = "-" if t["value"] is None else f"{t['value']:.2f}x"
            print(f"  {t['status']:<5}  {t['target']:<52} measured {val:>7}   {t['detail']}")
        out = {"bench": self.name, "toy": getattr(self.args, "toy", False),
               "args": vars(self.args), "system": self.info, **data,
               "contenders": {k: r.to_json() for k, r in runs.items()},
               "targets": self.targets}
        print(f"\nJSON: {write_json(Path(self.args.json), out)}")
        failed = [k for k, r in runs.items() if not r.ok]
        if failed:
            print(f"contenders that failed: {', '.join(failed)}", file=sys.stderr)
        for f in self.failures:
            print(f, file=sys.stderr)
        return 1 if failed or self.failures else 0


def result_of(runs: dict, key: str) -> dict | None:
    """A contender's (first) result, or None when it did not run or failed."""
    r = runs.get(key)
    return r.results[0] if r is not None and r.ok and r.results else None


def repeat_key(key: str, i: int) -> str:
    """The key of run ``i`` (from 0) of a contender run several times (``--repeat``): the
    first keeps ``key``, so a single run's key is unchanged."""
    return key + (f"#{i + 1}" if i else "")


def repeats_of(runs: dict, key: str) -> list[tuple[str, dict]]:
    """``(key, result)`` of every repeat of ``key`` (``repeat_key``) that gave a result."""
    found = ((k, result_of(runs, k)) for k in runs if k == key or k.startswith(key + "#"))
    return [(k, x) for k, x in found if x is not None]


def contender_row(runs: dict, key: str, label: str) -> tuple[dict, list[str] | None]:
    """A contender's data row as its run reports it (cap, cgroup peak, exit status) and, when
    it failed, its table cells: the benches' 11 columns, the reason last."""
    r = runs[key]
    mem = r.memlimit or {}
    row = {"key": key, "contender": label, "ok": r.ok, "capped": r.capped,
           "cap_bytes": r.cap_bytes, "cgroup_max_usage": mem.get("max_usage"),
           "cgroup_failcnt": mem.get("failcnt"), "returncode": r.returncode}
    if result_of(runs, key) is not None:
        return row, None
    why = failure_reason(r)
    row.update(batch=None, tok_s=None, note=why)
    return row, [label, "?", "-", "-", "-", "-", "-",
                 fmt_bytes(r.cap_bytes) if r.capped else "uncapped",
                 fmt_bytes(mem.get("max_usage")), "-", why]


def same_tokens(ref: dict | None, x: dict) -> tuple[bool, int] | None:
    """Whether ``x``'s greedy tokens equal the reference's over their common length."""
    if ref is None:
        return None
    n = min(len(ref["generated"][0]), len(x["generated"][0]))
    return [g[:n] for g in ref["generated"]] == [g[:n] for g in x["generated"]], n


def run_notes(r, x: dict) -> list[str]:
    """What a run itself says about its figure: cgroup limit hits, page faults, other
    processes on the CPUs."""
    notes = []
    if r.memlimit and r.memlimit.get("failcnt"):
        notes.append(f"cgroup at its limit {r.memlimit['failcnt']}x")
    if x.get("major_faults"):
        notes.append(f"{x['major_faults'] / max(x['tokens'], 1):.0f} major faults/step")
    if r.foreign_cpu is not None and r.foreign_cpu > 0.05:
        notes.append(f"OTHER PROCESSES used {r.foreign_cpu:.0%} of the CPUs")
    return notes


def random_prompts(batch: int, length: int, vocab: int, seed: int = 1):
    """Token ids every contender of a bench decodes from (the same seed everywhere)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g, dtype=torch.long)


def positions_for(batch: int, prompt_len: int, tokens: int, warmup: int) -> int:
    """Positions (batch x context) the offload runtime must reserve KV cache for."""
    return batch * (prompt_len + 1 + warmup + tokens + 1)


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    if not path.is_absolute():
        path = REPO_ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path


# -- command line --------------------------------------------------------------------------------
def bench_parser(doc: str, *, tokens: int, work_dir: str, json_path: str,
                 rows: str) -> argparse.ArgumentParser:
    """The flags every bench shares, and the internal ones a contender subprocess gets;
    ``bench_defaults`` fills the toy-dependent defaults after parsing."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="a tiny model (CI smoke run)")
    p.add_argument("--tokens", type=int, default=None,
                   help=f"decode tokens timed per run (default {tokens}; toy 4)")
    p.add_argument("--accelerate-tokens", type=int, default=None,
                   help="decode tokens timed for Accelerate, which is slow (default 4; toy 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 16; toy 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed decode tokens after prefill")
    p.add_argument("--budget", default=None,
                   help="offload/Accelerate budget: bytes, '550MB' or a percentage of the weights "
                        "(default 25%%; toy 35%%)")
    p.add_argument("--work-dir", default=work_dir,
                   help="model, packed store and Accelerate offload folder (reused)")
    p.add_argument("--json", default=json_path,
                   help="where to write the JSON results (relative to the repo root)")
    p.add_argument("--no-cap", action="store_true", help="run every contender uncapped")
    p.add_argument("--cap-slack", type=int, default=None,
                   help="bytes added to every cap (default 0; toy 256 MB, since a few-MB budget "
                        "next to a 350 MB interpreter makes the bare cap a coin toss)")
    p.add_argument("--prefill-logits", choices=("last", "all"), default="last",
                   help="prefill with logits_to_keep=1 like generate() (last, default) or "
                        "compute every position's logits (all; diagnosis)")
    p.add_argument("--only", default=None, help=f"comma-separated rows to run: {rows}")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per contender")
    p.add_argument("--quiet", action="store_true", help="do not echo contender output")
    p.add_argument("--wait-quiet", type=float, default=None,
                   help="before each contender wait up to this many seconds for other "
                        "processes to leave the CPUs idle (default 60; toy 0)")
    # internal: one contender in a subprocess
    p.add_argument("--contender", help=argparse.SUPPRESS)
    p.add_argument("--n-tokens", type=int, default=tokens, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--offload-dir", help=argparse.SUPPRESS)
    p.add_argument("--accelerate-offload-dir", help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, help=argparse.SUPPRESS)
    return p


def bench_defaults(a: argparse.Namespace, *, tokens: int) -> argparse.Namespace:
    """Defaults that depend on ``--toy``."""
    if a.tokens is None:
        a.tokens = 4 if a.toy else tokens
    if a.accelerate_tokens is None:
        a.accelerate_tokens = 4
    if a.prompt_len is None:
        a.prompt_len = 8 if a.toy else 16
    if a.cap_slack is None:
        a.cap_slack = (256 << 20) if a.toy else 0
    if a.wait_quiet is None:
        a.wait_quiet = 0 if a.toy else 60
    if a.budget is None:
        a.budget = "35%" if a.toy else "25%"
    return a


@dataclass
class BuiltModel:
    """A bench's model, built (or reused) under its work dir."""

    work: Path
    dims: dict
    info: dict
    model_dir: Path
    model_info: dict


DEFAULT_IDLE_IMPORTS = "import torch, transformers, accelerate; from transformers import LlamaForCausalLM"


@dataclass
class Machine:
    """What a bench measures of this machine for its run: the disk under the store, the idle
    interpreter, and the cap every capped contender runs under (budget + idle + slack)."""

    disk: dict
    idle: int
    cap: int
    capped: bool
    cg_reason: str
    idle_cg: int | None

    @classmethod
    def measure(cls, a: argparse.Namespace, budget: int, data_path: Path, *,
                idle_imports: str = DEFAULT_IDLE_IMPORTS, cgroup_idle: bool = True
                ) -> "Machine":
        build_kernels()
        idle = idle_footprint(idle_imports)
        capped, reason = (False, "disabled by --no-cap") if a.no_cap else cgroup_status()
        return cls(disk_bandwidth(data_path), idle, budget + idle + a.cap_slack, capped, reason,
                   idle_footprint_cgroup(idle_imports) if capped and cgroup_idle and not a.toy
                   else None)

    def rows(self, a: argparse.Namespace) -> list[tuple[str, str]]:
        return cap_and_disk_rows(self.cap, self.idle, a.cap_slack, self.capped, self.cg_reason,
                                 self.idle_cg, self.disk)

    def cap_for(self, capped_run: bool) -> int | None:
        """The cap a contender runs under: ``None`` for an uncapped one (or an uncapped run)."""
        return self.cap if capped_run and self.capped else None

    def as_json(self) -> dict:
        return {"idle_bytes": self.idle, "idle_cgroup_bytes": self.idle_cg,
                "cap_bytes": self.cap, "capped": self.capped, "cgroup": self.cg_reason,
                "disk": self.disk}


def build_kernels() -> None:
    """Build offload's CPU kernels now, outside every cap: a contender's first use would
    compile them inside its memory cap (the compiler's pages counted against the budget, and
    thrashing there: a 457 MB cap took minutes, then killed the run)."""
    from offload.kernels import _build

    for name in ("bitmap_decode_cpu", "gguf_dequant_cpu", "gguf_matmul_cpu"):
        _build.cpu_library(name)


def cap_and_disk_rows(cap: int, idle: int, slack: int, capped: bool, reason: str,
                      idle_cgroup: int | None, disk: dict) -> list[tuple[str, str]]:
    """The header rows every bench prints about its memory cap and the measured disk."""
    if capped:
        cap_text = (f"{fmt_bytes(cap)} = budget + idle interpreter RSS {fmt_bytes(idle)} "
                    + (f"+ slack {fmt_bytes(slack)} (--cap-slack: not the issue's cap) "
                       if slack else "")
                    + f"({reason}); page cache dropped before each capped contender"
                    + (f"; the idle interpreter as its cgroup counts it (with the page cache "
                       f"of its imports): {fmt_bytes(idle_cgroup)}" if idle_cgroup else ""))
    else:
        cap_text = f"NONE - contenders run UNCAPPED: {reason} (idle interpreter {fmt_bytes(idle)})"
    disk_text = (f"{fmt_bytes(disk['bps'])}/s sequential "
                 f"{'O_DIRECT' if disk['direct'] else 'BUFFERED (O_DIRECT refused)'} "
                 f"{disk['chunk'] >> 20} MiB reads of {fmt_bytes(disk['bytes'])} "
                 f"({Path(disk['path']).name})")
    return [("memory cap", cap_text), ("disk bandwidth", disk_text)]


def bench_entry(parse_args, contender_main, main) -> None:
    """Every bench's ``__main__``: one contender in a subprocess (``--contender``), or the
    parent that launches them and prints the table."""
    args = parse_args()
    if args.contender:
        contender_main(args)
    else:
        sys.exit(main(args))


def load_with_accelerate(model_dir, budget_bytes: int, offload_folder):
    """The Accelerate contender's load, the same in every bench: bf16, ``device_map="auto"``
    with ``max_memory={"cpu": budget}`` and an offload folder. Prints where Accelerate put
    the weights; returns the model (eval mode) and that device-map summary."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map="auto",
        max_memory={"cpu": int(budget_bytes)}, offload_folder=offload_folder)
    dm = device_map_summary(model)
    print("accelerate device map: " + ", ".join(
        f"{dev}: {d['modules']} modules {fmt_bytes(d['bytes'])}" for dev, d in dm.items()),
        flush=True)
    if "disk" not in dm:
        print("WARNING: Accelerate placed nothing on disk at this budget", flush=True)
    return model.eval(), dm
