"""A Google Cloud Storage server on 127.0.0.1, for running workdirs on ``gs://``.

``gcp-storage-emulator`` serves the JSON API that both of a run's storage
clients speak: gcsfs (``etils.epath``'s ``gs://`` backend: ``config.json``,
``metrics.jsonl``, orbax's directories) and tensorstore (orbax's array
writer). Its media downloads leave out the ``x-goog-generation`` header that
tensorstore reads an object's generation from, so :func:`serve` adds it; it
ignores the ``ifGenerationMatch=0`` precondition of an upload (create only if
absent: what a workdir's lease lock is made with), which :func:`serve` makes
it honour with Cloud Storage's 412; and it prints a traceback for every client
that hangs up mid-reply, which :func:`serve` leaves out.
"""

from __future__ import annotations

import contextlib
import functools
import http
import http.server
import json
import logging
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator, NamedTuple

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects

BUCKET = 'bucket'
_download_without_generation = objects.download


def _download(request, response, storage, *args, **kwargs):
  _download_without_generation(request, response, storage, *args, **kwargs)
  try:
    stored = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # pylint: disable=broad-except
    return  # a missing object: the 404 is already set
  response['x-goog-generation'] = stored['generation']
  response['x-goog-metageneration'] = stored['metageneration']


_insert_without_preconditions = objects.insert


def _insert(request, response, storage, *args, **kwargs):
  if request.query.get('ifGenerationMatch') == ['0']:
    name = (request.query.get('name') or [None])[0]
    if name is None and isinstance(request.data, dict):
      name = (request.data.get('meta') or request.data).get('name')
    try:
      storage.get_file_obj(request.params['bucket_name'], name)
    except Exception:  # pylint: disable=broad-except
      pass  # absent: the upload may create it
    else:
      response.status = http.HTTPStatus.PRECONDITION_FAILED
      return None
  return _insert_without_preconditions(request, response, storage, *args, **kwargs)


def _patch_handlers() -> None:
  for _, handlers in emulator.HANDLERS:
    for method, handler in handlers.items():
      if handler is _insert_without_preconditions:
        handlers[method] = _insert
  _add_generation_headers()


def _add_generation_headers() -> None:
  # Downloads are routed to objects.download directly and through objects.get
  # (which looks the name up at call time): replace both.
  objects.download = _download
  for _, handlers in emulator.HANDLERS:
    for method, handler in handlers.items():
      if handler is _download_without_generation:
        handlers[method] = _download


class _QuietServer(http.server.HTTPServer):

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], ConnectionError):  # not a client that hung up
      super().handle_error(request, client_address)


def _serve_quietly(thread: emulator.APIThread) -> None:
  # APIThread.run with _QuietServer for http.server.HTTPServer.
  thread._httpd = _QuietServer((thread._host, thread._port),  # pylint: disable=protected-access
                               functools.partial(emulator.RequestHandler, thread._storage))
  thread.is_running.set()
  thread._httpd.serve_forever()  # pylint: disable=protected-access


class FakeGcs(NamedTuple):
  """A running server holding the bucket ``BUCKET``."""
  url: str

  @property
  def env(self) -> dict[str, str]:
    """What a process needs to reach this server as ``gs://``."""
    return {'STORAGE_EMULATOR_HOST': self.url,  # gcsfs
            # gcsfs's bucket-layout lookup goes to the Storage Control gRPC API,
            # which the fake lacks: every access would log a warning.
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
            'TENSORSTORE_GCS_HTTP_URL': self.url,  # tensorstore
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake'}  # tensorstore: no credentials lookup

  def names(self, prefix: str) -> list[str]:
    """Names of the objects under ``prefix`` (read straight from the server, no client cache)."""
    names, page = [], None
    while True:
      query = {'prefix': prefix, **({'pageToken': page} if page else {})}
      with urllib.request.urlopen(
          f'{self.url}/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}') as reply:
        listing = json.load(reply)
      names += [item['name'] for item in listing.get('items', [])]
      page = listing.get('nextPageToken')
      if not page:
        return names

  def read(self, name: str) -> str | None:
    """The object's text, or None if there is none."""
    quoted = urllib.parse.quote(name, safe='')
    try:
      with urllib.request.urlopen(
          f'{self.url}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media') as reply:
        return reply.read().decode()
    except urllib.error.HTTPError as error:
      if error.code == 404:
        return None
      raise


  def metrics(self, folder: str) -> list[dict]:
    """The records of ``folder/metrics.jsonl`` (empty while there is none)."""
    text = self.read(f'{folder}/metrics.jsonl') or ''
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def serve() -> Iterator[FakeGcs]:
  """Runs a fresh in-memory server on a free port of 127.0.0.1 until the block ends."""
  _patch_handlers()
  emulator.APIThread.run = _serve_quietly
  # Every 404 (tensorstore probes for objects that do not exist yet) is logged as an error.
  logging.getLogger('gcp_storage_emulator.storage').setLevel(logging.CRITICAL)
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  server = emulator.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
  server.start()
  try:
    yield FakeGcs(f'http://127.0.0.1:{port}')
  finally:
    server.stop()
