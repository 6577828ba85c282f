"""Flower on the real test Redis, and `joycap-queue up` as a user would run it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from joycap_queue.ops.services import free_port, redis_reachable
from tests.support.jobs import all_finished, jobs_in
from tests.support.services import Service, wait_until

USER, PASSWORD = "captioner", "flower-secret-pw"


def get(url: str, *, auth: bool = True) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment holds ``marker`` (what `up` started and did not stop)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_flower_sees_workers_tasks_and_metrics(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(sqlite_url)
    service.env.update(JOYCAP_FLOWER_USER=USER, JOYCAP_FLOWER_PASSWORD=PASSWORD)
    port = free_port()
    log = (tmp_path / "flower.out").open("wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "joycap_queue", "flower", "--port", str(port)],
        env=service.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "Flower at" in (tmp_path / "flower.out").read_text(), timeout=60, what="Flower")
        service.start_worker()
        images = tmp_path / "in"
        images.mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 80, 20, 200)).save(images / f"{i}.png")
        service.cli("submit", str(images))
        wait_until(all_finished(sqlite_url, 3), timeout=120, what="three jobs")

        def tasks_succeeded() -> bool:
            status, body = get(f"{base}/api/tasks")
            tasks = json.loads(body) if status == 200 else {}
            return len(tasks) == 3 and all(t["state"] == "SUCCESS" for t in tasks.values())

        wait_until(tasks_succeeded, timeout=30, what="Flower to list three succeeded tasks")
        status, body = get(f"{base}/api/tasks")
        assert {task["name"] for task in json.loads(body).values()} == {"joycap.caption"}
        status, body = get(f"{base}/api/workers?refresh=1")
        assert status == 200 and any(name.startswith("w1@") for name in json.loads(body))
        status, body = get(f"{base}/metrics", auth=False)
        metrics = body.decode()
        succeeded = [
            line
            for line in metrics.splitlines()
            if line.startswith("flower_events_total")
            and 'type="task-succeeded"' in line
            and "joycap.caption" in line
        ]
        assert succeeded and float(succeeded[0].rsplit(" ", 1)[1]) >= 3, metrics[:2000]
        assert get(f"{base}/api/workers", auth=False)[0] == 401
        assert get(f"{base}/api/tasks", auth=False)[0] == 401
        assert f"flower: http://127.0.0.1:{port}" in service.cli("status").stdout
    finally:
        flower.send_signal(signal.SIGTERM)
        assert flower.wait(timeout=30) == 0
    output = (tmp_path / "flower.out").read_text()
    assert PASSWORD not in output


def test_flower_refuses_to_start_without_auth_or_off_localhost(
    sqlite_url: str, service_for: Callable[[str], Service]
) -> None:
    service = service_for(sqlite_url)
    no_auth = service.cli("flower", check=False)
    assert no_auth.returncode == 1 and "Flower needs basic auth" in no_auth.stderr
    exposed = service.cli("flower", "--no-auth", "--address", "0.0.0.0", check=False)
    assert exposed.returncode == 2 and "only on localhost" in exposed.stderr
    assert "Traceback" not in no_auth.stderr + exposed.stderr


def test_up_captions_an_inbox_and_leaves_nothing_behind(
    sqlite_url: str, service_for: Callable[[str], Service], tmp_path: Path
) -> None:
    service = service_for(sqlite_url)
    # Nothing listens there: `up` must start a Redis of its own.
    service.env["JOYCAP_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    marker = service.env["JOYCAP_QUEUE"]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    out = (tmp_path / "up.out").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "joycap_queue", "up", str(inbox), "--port", str(free_port())],
        env=service.env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: "watching:" in (tmp_path / "up.out").read_text(), timeout=120, what="up to start")
        text = (tmp_path / "up.out").read_text()
        assert "started redis-server" in text and "flower:   http://127.0.0.1:" in text
        assert f"database: {sqlite_url.removeprefix('sqlite:///')}" in text
        for i in range(2):
            Image.new("RGB", (50, 40), (200, i * 90, 10)).save(inbox / f"drop-{i}.png")
        wait_until(all_finished(sqlite_url, 2), timeout=120, what="dropped images")
        wait_until(lambda: (inbox / "drop-1.txt").exists() and (inbox / "drop-0.txt").exists(), timeout=30)
        assert {job.status for job in jobs_in(sqlite_url)} == {"done"}
        assert len(processes_with(marker)) >= 3  # up itself, the worker, Flower (and their children)
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0, (tmp_path / "up.out").read_text()
    time.sleep(0.5)
    assert processes_with(marker) == []  # workers, Flower and the Redis it started all inherit the marker
    assert not redis_reachable(service.env["JOYCAP_BROKER_URL"])
