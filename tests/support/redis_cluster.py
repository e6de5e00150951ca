"""A real 3-master Redis Cluster for tests: redis-server processes on free ports, joined by redis-cli."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from harness.redis_server import RedisServer


class RedisClusterServer:
    """`masters` redis-server processes with `--cluster-enabled yes` (AOF, fsync always), no replicas.

    `start()` joins them with `redis-cli --cluster create` and waits until every node reports
    `cluster_state:ok`; `stop()` terminates every process, so nothing outlives the test session.
    """

    def __init__(self, folder: Path, masters: int = 3) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:  # a test that needs a cluster must fail, not skip, where it is missing
            raise RuntimeError("redis-cli is not installed; the Redis Cluster tests need it")
        self.cli = cli
        self.nodes = [RedisServer(folder / f"node{i}", cluster=True) for i in range(masters)]
        self.url = f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    def _wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._state(node.port) == "ok" for node in self.nodes):
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")

    @staticmethod
    def _state(port: int) -> str:
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        try:
            return str(client.cluster("info")["cluster_state"])
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL every node: only what their AOFs hold survives."""
        for node in self.nodes:
            node.kill()

    def restart(self) -> None:
        """Start every node again on its port and folder (nodes.conf keeps the cluster, the AOF the data)."""
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                node.start()
        self._wait_ok()

    def flush(self) -> None:
        """Empty every master (each holds its own slots)."""
        for node in self.nodes:
            node.flush()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
