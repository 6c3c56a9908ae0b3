"""TLS, mutual TLS and the bearer token, against the real server, with the SDK."""

import grpc
import pytest

from qwen2_client import AuthenticationError, Client, Qwen2Error, RetryPolicy
from shards.checkpoint import preset_config, write_random_checkpoint
from tests.certs import make_certificates
from tests.server_process import InProcessServer

NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    model_dir = write_random_checkpoint(tmp_path_factory.mktemp("m") / "tiny", preset_config("tiny"))
    d = make_certificates(tmp_path_factory.mktemp("certs"))
    server = InProcessServer(model_dir, tp=1, server_options=dict(
        tls_cert_file=str(d / "server.pem"), tls_key_file=str(d / "server.key"),
        tls_client_ca_file=str(d / "ca.pem"), auth_token="s3cret"))
    yield server, d
    server.stop()


def client(server, d, token=None, cert=True):
    keys = dict(private_key=(d / "client.key").read_bytes(), certificate_chain=d / "client.pem") if cert else {}
    return Client(f"localhost:{server.server.port}", tls=True, root_certificates=str(d / "ca.pem"), token=token,
                  retry=NO_RETRY, **keys)


def test_mtls_with_the_token_serves(secured):
    server, d = secured
    with client(server, d, token="s3cret") as c:
        assert c.generate("Hello", max_new_tokens=3, ignore_eos=True).usage.generated_tokens == 3


def test_wrong_or_missing_token_is_unauthenticated_but_health_is_open(secured):
    server, d = secured
    for token in (None, "s3cre", "s3cret "):
        with client(server, d, token=token) as c:
            with pytest.raises(AuthenticationError):
                c.generate("Hello", max_new_tokens=2)
            assert c.health() == "SERVING"


def test_no_client_certificate_no_connection(secured):
    server, d = secured
    with client(server, d, token="s3cret", cert=False) as c:
        with pytest.raises(Qwen2Error) as e:
            c.generate("Hello", max_new_tokens=2, timeout=10)
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
