"""A real S3 API on 127.0.0.1 for the tests: moto's threaded server, with fake credentials.

:data:`S3_ENV` is put into the environment when the tests start (before any Ray worker is spawned, so
workers inherit it): the endpoint points at a port on 127.0.0.1 and the credential files at nothing, so no
test can reach another host or read a developer's real credentials. :func:`start_server` starts the
server on that port (once, by the ``s3_bucket`` fixture).
"""

from __future__ import annotations

import os
import socket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
ENDPOINT = f"http://127.0.0.1:{PORT}"
S3_ENV = {
    "AWS_ENDPOINT_URL": ENDPOINT,
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_server():
    """Start moto's S3 server on :data:`PORT` (127.0.0.1); returns it (call ``.stop()``)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=PORT, verbose=False)
    server.start()
    return server


def create_bucket(name: str) -> str:
    """Create bucket ``name`` on the server; -> ``s3://name``."""
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=ENDPOINT, region="us-east-1", allow_bucket_creation=True).create_dir(
        name
    )
    return f"s3://{name}"
