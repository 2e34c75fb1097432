#!/usr/bin/env python3
"""Run a command beside a throwaway Milvus 2.3.5 standalone server, reachable on loopback only.

    .venv/bin/python scripts/milvus_server.py run -- .venv/bin/python -m pytest tests/test_milvus_server.py
    .venv/bin/python scripts/milvus_server.py install     # only install the server (needs PyPI)

``run`` installs PyPI's ``milvus==2.3.5`` (a Milvus standalone binary and its launcher) into a
virtualenv of its own under ``.ci/milvus-server/`` (its pins never touch the project's venv),
moves into a private network namespace whose only interface is loopback (the server binds every
interface, so it must never run in the machine's own network), starts the server with its data in
a temporary folder, waits for its health check, and runs the command with
``RAG_PIPELINE_MILVUS_SERVER`` set to the server's address. Afterwards it stops the server:
loaded collections are released first (a 2.3 server hangs on SIGTERM otherwise), then SIGTERM,
then SIGKILL after a grace period; the data folder is deleted.

The exit status is the command's. A server that cannot be installed or started is an error
(exit 3, with the end of its logs), never a silent skip: whoever asked for the tier gets it or a
failure. Linux only (network namespaces); root, or unprivileged user namespaces, is needed.
Standard library only, so any Python runs it; run it with the project's Python so that
collections can be released through pymilvus before the server stops.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MILVUS_VERSION = "2.3.5"
ENV_VAR = "RAG_PIPELINE_MILVUS_SERVER"  # what the server tests read (tests/conftest.py)
GRPC_PORT = 19530
HEALTH_PORT = 9091
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 30.0
EXIT_SERVER_FAILED = 3

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / ".ci" / "milvus-server"  # git-ignored: the server's virtualenv and unpacked binaries
VENV_PYTHON = HOME / "venv" / "bin" / "python"
BINARIES = HOME / "bin"  # the package ships its binaries xz-compressed; unpacked once, checksummed
_IN_NAMESPACE_MARK = "_RAG_PIPELINE_MILVUS_NETNS"  # set across the re-exec, so it cannot loop


class ServerError(RuntimeError):
    """The server could not be installed, isolated or started."""


def log(message: str) -> None:
    print(f"milvus_server: {message}", file=sys.stderr, flush=True)


# ---- installing ----------------------------------------------------------------------------------


def install() -> None:
    """The server's own virtualenv with milvus==2.3.5, and its binaries unpacked (both idempotent)."""
    if not _venv_has_milvus():
        log(f"installing milvus=={MILVUS_VERSION} into {VENV_PYTHON.parent.parent}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV_PYTHON.parent.parent)], check=True)
        pip = [str(VENV_PYTHON), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
        if subprocess.run([*pip, f"milvus=={MILVUS_VERSION}"]).returncode != 0:
            raise ServerError(f"pip could not install milvus=={MILVUS_VERSION} (is PyPI reachable?)")
    # The launcher's own unpacker: skips files whose archive checksum is unchanged.
    _venv_python("import milvus, sys; milvus._initialize_data_files(sys.argv[1])", str(HOME))


def _venv_has_milvus() -> bool:
    if not VENV_PYTHON.exists():
        return False
    probe = subprocess.run(
        [str(VENV_PYTHON), "-c", "import milvus; print(milvus.__version__)"], capture_output=True, text=True
    )
    return probe.returncode == 0 and probe.stdout.strip() == MILVUS_VERSION


def _venv_python(code: str, *args: str) -> None:
    result = subprocess.run([str(VENV_PYTHON), "-c", code, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise ServerError(f"the milvus package failed: {result.stderr.strip()[-2000:]}")


# ---- the private network namespace ---------------------------------------------------------------


def in_private_network() -> bool:
    """True when loopback is the only network interface, so nothing bound here is reachable from outside."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def reexec_in_private_network(argv: list[str]) -> None:
    """Replace this process by itself inside a new network namespace (does not return)."""
    if os.environ.get(_IN_NAMESPACE_MARK):
        raise ServerError("unshare ran, but the new network namespace still has interfaces other than loopback")
    if shutil.which("unshare") is None:
        raise ServerError("`unshare` (util-linux) is needed to run the server in a private network namespace")
    user_namespace = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    os.environ[_IN_NAMESPACE_MARK] = "1"
    os.execvp(
        "unshare", ["unshare", "--net", *user_namespace, "--", sys.executable, str(Path(__file__).resolve()), *argv]
    )


def bring_loopback_up() -> None:
    """``ip link set lo up``, without needing iproute2: a new namespace starts with loopback down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


# ---- the server ----------------------------------------------------------------------------------


class MilvusServer:
    """One standalone server process with its data in ``data_dir``."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.uri = f"http://127.0.0.1:{GRPC_PORT}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the server and wait until it is healthy; returns the seconds that took."""
        started = time.monotonic()
        # The launcher's config writer fills its template with the data, log and port settings.
        _venv_python(
            "import milvus, sys; milvus.MilvusServerConfig(data_dir=sys.argv[1], "
            "proxy_port=int(sys.argv[2])).resolve()",
            str(self.data_dir),
            str(GRPC_PORT),
        )
        env = {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(HEALTH_PORT),
            "MILVUS_RUN_DIR": str(self.data_dir / "run"),
            "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(BINARIES), os.environ.get("LD_LIBRARY_PATH")])),
        }
        logs = self.data_dir / "logs"
        with open(logs / "stdout.log", "wb") as stdout, open(logs / "stderr.log", "wb") as stderr:
            # cwd: the server reads configs/milvus.yaml relative to it.
            self.process = subprocess.Popen(
                [str(BINARIES / "milvus"), "run", "standalone"],
                cwd=self.data_dir,
                env=env,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        self._wait_healthy(started)
        return time.monotonic() - started

    def _wait_healthy(self, started: float) -> None:
        url = f"http://127.0.0.1:{HEALTH_PORT}/healthz"
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(
                    f"the server exited during start-up (status {self.process and self.process.returncode})"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if b"OK" in response.read():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServerError(f"the server was not healthy at {url} within {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        """Release collections, then SIGTERM, then SIGKILL after a grace period."""
        if self.process is None or self.process.poll() is not None:
            return
        stopping = time.monotonic()
        self._release_collections()
        self.process.terminate()
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log(f"the server did not stop within {STOP_GRACE_S:.0f} s of SIGTERM; killing it (its data is disposable)")
            self.process.kill()
            self.process.wait()
        log(f"server stopped in {time.monotonic() - stopping:.1f} s")

    def _release_collections(self) -> None:
        try:
            from pymilvus import MilvusClient
        except ImportError:
            log("pymilvus is not importable here, so loaded collections stay loaded; stopping may need SIGKILL")
            return
        try:
            client = MilvusClient(uri=self.uri, timeout=10)
            try:
                for name in client.list_collections():
                    client.release_collection(name)
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - the server is stopped either way
            log(f"could not release collections before stopping: {exc}")

    def log_tail(self, lines: int = 40) -> str:
        """The end of each of the server's log files, for a failure message."""
        parts = []
        for path in sorted((self.data_dir / "logs").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(parts) or "(the server wrote no logs)"


def _die_with_parent() -> None:
    """In the server's process: get SIGKILL if the controlling process dies, so no server outlives a CI run."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


# ---- the command -------------------------------------------------------------------------------


def run(command: list[str], argv: list[str]) -> int:
    """Install if needed, isolate, start the server, run ``command`` beside it, stop the server."""
    if not in_private_network():
        install()  # before isolating: pip needs the network
        reexec_in_private_network(argv)
    os.environ.pop(_IN_NAMESPACE_MARK, None)
    bring_loopback_up()
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="milvus-server-") as data:
        server = MilvusServer(Path(data))
        try:
            return _serve(server, command)
        finally:
            server.stop()


def _serve(server: MilvusServer, command: list[str]) -> int:
    try:
        seconds = server.start()
    except (ServerError, OSError) as exc:
        log(f"FAILED to start Milvus {MILVUS_VERSION}: {exc}\n{server.log_tail()}")
        return EXIT_SERVER_FAILED
    log(f"Milvus {MILVUS_VERSION} standalone is up at {server.uri} (healthy after {seconds:.1f} s; loopback only)")
    return _run_command(command, {**os.environ, ENV_VAR: server.uri})


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a CI timeout, say) unwinds like Ctrl-C, so the server is still stopped."""
    raise KeyboardInterrupt


def _run_command(command: list[str], env: dict[str, str]) -> int:
    child = subprocess.Popen(command, env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    commands.add_parser("install", help=f"install milvus=={MILVUS_VERSION} into {HOME.relative_to(REPO)}/")
    run_parser = commands.add_parser("run", help=f"run COMMAND with {ENV_VAR} pointing at a fresh server")
    run_parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            install()
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("run needs a command: run -- COMMAND [ARGS...]")
        return run(command, argv)
    except ServerError as exc:
        log(f"FAILED: {exc}")
        return EXIT_SERVER_FAILED


if __name__ == "__main__":
    sys.exit(main())
