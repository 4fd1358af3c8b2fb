"""API keys and tenants: 401 for a missing or unknown key, 404 (never 403) across tenants,
and the refusal to listen on a non-loopback address without keys."""

from __future__ import annotations

import openai
import pytest

from sdkutil import (
    CHAT,
    assert_envelope,
    assert_http_envelope,
    chat_line,
    envelope_of,
    make_config,
    run_batch,
    upload,
    wait_for,
)

TENANTS = {"team-a": ["sk-team-a-1", "sk-team-a-2"], "team-b": ["sk-team-b"]}


@pytest.fixture(scope="module")
def server(launcher, mock):
    return launcher.server(make_config(mock.base_url, tenants=TENANTS))


@pytest.fixture(scope="module")
def a1(server):
    return server.client("sk-team-a-1")


@pytest.fixture(scope="module")
def a2(server):
    return server.client("sk-team-a-2")


@pytest.fixture(scope="module")
def b(server):
    return server.client("sk-team-b")


@pytest.fixture(scope="module")
def team_a_objects(a1):
    """A file, a finished batch (with its output file) and a user_data file owned by team-a."""
    f = upload(a1, [chat_line("a-1"), chat_line("a-2")])
    batch = a1.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    batch = wait_for(a1, batch.id, ("completed",))
    other = upload(a1, b"team-a private", purpose="user_data")
    return {"file": f, "batch": batch, "user_file": other}


def assert_401(exc: openai.AuthenticationError) -> None:
    assert exc.status_code == 401
    assert exc.code == "invalid_api_key"
    assert_envelope(envelope_of(exc), code="invalid_api_key")
    assert envelope_of(exc)["error"]["type"] == "invalid_request_error"


def test_healthz_needs_no_key(server):
    with server.http() as h:
        assert h.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", ["/v1/files", "/v1/batches", "/v1/models", "/v1/files/file-x",
                                  "/v1/batches/batch_x"])
def test_missing_key_is_401(server, path):
    with server.http() as h:  # no Authorization header at all
        r = h.get(path)
    assert_http_envelope(r, 401, code="invalid_api_key")


def test_malformed_authorization_is_401(server):
    with server.http() as h:
        for value in ("sk-team-a-1", "Basic c2stdGVhbS1hLTE6", "Bearer", "Bearer sk-team-a-1x"):
            r = h.get("/v1/files", headers={"Authorization": value})
            assert_http_envelope(r, 401, code="invalid_api_key")


def test_wrong_key_is_401(server):
    bad = server.client("sk-not-a-key")
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.files.list()
    assert_401(ei.value)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.batches.create(input_file_id="file-x", endpoint=CHAT, completion_window="24h")
    assert_401(ei.value)
    with pytest.raises(openai.AuthenticationError) as ei:
        upload(bad, [chat_line("x")])
    assert_401(ei.value)


def test_error_does_not_echo_the_key(server):
    bad = server.client("sk-secret-looking-value-123")
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.files.list()
    assert "sk-secret-looking-value-123" not in ei.value.response.text


def test_keys_of_one_tenant_share_objects(a1, a2, team_a_objects):
    f, batch = team_a_objects["file"], team_a_objects["batch"]
    assert a2.files.retrieve(f.id).id == f.id
    assert a2.batches.retrieve(batch.id).status == "completed"
    assert f.id in {x.id for x in a2.files.list()}
    assert batch.id in {x.id for x in a2.batches.list(limit=100)}
    assert a2.files.content(team_a_objects["user_file"].id).read() == b"team-a private"


def test_other_tenant_gets_404(b, team_a_objects):
    f, batch, other = team_a_objects["file"], team_a_objects["batch"], team_a_objects["user_file"]
    calls = [
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(f.id),
        lambda: b.files.content(batch.output_file_id),
        lambda: b.files.retrieve(other.id),
        lambda: b.files.delete(other.id),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        # using another tenant's file as a batch input looks exactly like an unknown file
        lambda: b.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as ei:
            call()
        assert_envelope(envelope_of(ei.value))


def test_other_tenant_does_not_list(b, a1, team_a_objects):
    a_ids = {team_a_objects["file"].id, team_a_objects["user_file"].id, team_a_objects["batch"].output_file_id}
    assert not a_ids & {x.id for x in b.files.list()}
    assert team_a_objects["batch"].id not in {x.id for x in b.batches.list(limit=100)}
    # team-b's own objects are visible to team-b and not to team-a
    mine = run_batch(b, [chat_line("b-1")])
    assert mine.status == "completed"
    assert mine.id in {x.id for x in b.batches.list(limit=100)}
    assert mine.id not in {x.id for x in a1.batches.list(limit=100)}
    with pytest.raises(openai.NotFoundError):
        a1.batches.retrieve(mine.id)
    # the 404 for another tenant's id looks the same as for an id that never existed
    with pytest.raises(openai.NotFoundError) as foreign:
        b.files.retrieve(team_a_objects["file"].id)
    with pytest.raises(openai.NotFoundError) as unknown:
        b.files.retrieve("file-neverexisted00000000000")
    assert foreign.value.code == unknown.value.code and foreign.value.type == unknown.value.type


def test_team_a_objects_survive_team_b_attempts(a1, team_a_objects):
    assert a1.files.content(team_a_objects["user_file"].id).read() == b"team-a private"
    assert a1.batches.retrieve(team_a_objects["batch"].id).status == "completed"


# ----------------------------------------------------------------------------- insecure listen


def test_refuses_public_listen_without_keys(launcher, mock, tmp_path):
    args = ["serve", "--listen", "0.0.0.0:0", "--data-dir", tmp_path / "data", "--upstream", mock.base_url]
    code, proc = launcher.run_to_exit(args, timeout=30)
    assert code is not None, "batchd with no keys on 0.0.0.0 should refuse to start, but it kept running"
    assert code != 0
    assert "--insecure-no-auth" in proc.output(), proc.log_tail()


def test_public_listen_with_insecure_flag(launcher, mock, tmp_path):
    srv = launcher.server(upstream=mock.base_url, listen="0.0.0.0:0", data_dir=tmp_path / "data",
                          extra=["--insecure-no-auth"])
    try:
        with srv.http() as h:
            assert h.get("/healthz").status_code == 200
        assert srv.client().files.list().data is not None
    finally:
        assert srv.stop() == 0
