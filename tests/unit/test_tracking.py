"""medseg.tracking: the bounded wait for an MLflow server that does not answer."""

from __future__ import annotations

import time

import pytest

from medseg.errors import TrackingError
from medseg.services.process import free_port
from medseg.tracking import configure_client, is_server, patient, unreachable


def test_a_closed_port_is_waited_for_then_reported_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    environ: dict[str, str] = {}
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    configure_client(uri, environ)
    assert environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(uri)
    tries = []

    def call() -> object:
        tries.append(time.monotonic())
        return client.get_experiment_by_name("x")

    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        patient(call, what="reading the experiment", uri=uri, wait_s=3, hint="run it again")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"the MLflow tracking server {uri} did not answer for 3 s")
    assert "while reading the experiment" in message and message.endswith("run it again")
    assert len(tries) >= 2 and time.monotonic() - started >= 3


def test_other_errors_pass_at_once() -> None:
    calls = []

    def call() -> None:
        calls.append(1)
        raise ValueError("a bad request")

    with pytest.raises(ValueError, match="a bad request"):
        patient(call, what="x", uri="http://127.0.0.1:1", wait_s=30)
    assert calls == [1]
    assert not unreachable(ValueError("RESOURCE_ALREADY_EXISTS"))
    assert unreachable(ConnectionRefusedError())


def test_local_stores_are_not_servers() -> None:
    environ: dict[str, str] = {}
    configure_client("sqlite:///x.db", environ)
    assert environ == {}
    assert is_server("https://mlflow.example") and not is_server("sqlite:///x.db") and not is_server(None)


def test_a_call_that_succeeds_after_a_failure_returns_its_value() -> None:
    answers = iter([ConnectionError("refused"), 42])

    def call() -> int:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert patient(call, what="x", uri="u", wait_s=10) == 42
