"""A real Celery worker (kombu over py-amqp) against Tidegate: a task round trip with the rpc:// result backend, as a
Celery application configured with `broker_url="amqp://guest:guest@127.0.0.1:<port>//"` would run it on RabbitMQ."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 60.0

TASKS = textwrap.dedent("""
    import os
    from celery import Celery

    app = Celery("tidegate_tasks", broker=os.environ["BROKER_URL"], backend="rpc://")
    app.conf.broker_connection_retry_on_startup = False
    app.conf.task_default_queue = os.environ.get("TASK_QUEUE", "celery")

    @app.task(name="tidegate_tasks.add")
    def add(x, y):
        return x + y
""")


@pytest.fixture
def celery_worker(amqp_broker, tmp_path):
    pytest.importorskip("celery")
    port = amqp_broker.host_port("amqp")[1]
    (tmp_path / "tidegate_tasks.py").write_text(TASKS)
    env = {"BROKER_URL": f"amqp://guest:guest@127.0.0.1:{port}//", "TASK_QUEUE": "tidegate-celery",
           "PYTHONPATH": str(tmp_path)}
    env = {**os.environ, **env}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tidegate_tasks", "worker", "--pool=solo", "--loglevel=INFO",
             "-Q", "tidegate-celery",
             "--hostname", "tidegate-worker@%h"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield env, tmp_path, log_path
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=TIMEOUT)


def test_celery_worker_runs_a_task_and_returns_its_result(celery_worker):
    """`add.delay(2, 3).get()` from a client process returns 5 computed by the worker subprocess."""
    env, cwd, log_path = celery_worker
    client = textwrap.dedent("""
        from tidegate_tasks import add
        print("RESULT", add.delay(2, 3).get(timeout=45))
    """)
    result = subprocess.run([sys.executable, "-c", client], cwd=cwd, env=env, capture_output=True,
                            timeout=TIMEOUT)
    assert b"RESULT 5" in result.stdout, (result.stdout, result.stderr[-3000:],
                                          log_path.read_text(errors="replace")[-3000:])


def test_celery_remote_control_ping_reaches_the_worker_and_returns_its_reply(celery_worker):
    """`app.control.ping()` goes over the pidbox fanout exchange and comes back through the reply exchange."""
    env, cwd, log_path = celery_worker
    client = textwrap.dedent("""
        from tidegate_tasks import add, app
        add.delay(1, 1).get(timeout=45)  # the worker is up and consuming
        print("PING", app.control.ping(timeout=5.0))
    """)
    result = subprocess.run([sys.executable, "-c", client], cwd=cwd, env=env, capture_output=True,
                            timeout=TIMEOUT)
    assert b"tidegate-worker@" in result.stdout and b"pong" in result.stdout, (
        result.stdout, result.stderr[-3000:], log_path.read_text(errors="replace")[-3000:])
