"""Where shards live (a local folder or a URL), and read streams that survive a dropped connection.

`data.shards`, `t2f eval --shards` and `t2f shards verify` take a *location*: the folder that holds
manifest.json, vocab.json and the tars, given as one of
  - a local path:                    shards/mmcelebahq
  - http(s)://host/path/mmcelebahq   Python's own HTTP client; a password for the host comes from
                                     ~/.netrc (or the file $NETRC names), as curl -n reads it
  - s3://bucket/prefix, gs://bucket/prefix, or any other fsspec protocol, through fsspec and its
    backend (`pip install 't2f[remote]'`), with credentials from the backend's usual places: AWS_*
    variables or ~/.aws for S3 (an S3-compatible store on premises: AWS_ENDPOINT_URL_S3, or
    `endpoint_url` in ~/.aws/config), GOOGLE_APPLICATION_CREDENTIALS or gcloud's login for GCS
  - pipe:COMMAND, WebDataset's style, with {name} where the file name goes; the command writes
    the file to stdout:            pipe:aws s3 cp s3://bucket/prefix/{name} -

`location_of(shards, name)` names one file of the folder; `open_location(where)` opens it as a
stream. A remote stream that fails (a dropped connection, `timeout` seconds without a byte, an
HTTP 5xx, a command that exits non-zero) reopens where it stopped: an HTTP Range request, a seek,
or the command run again with the bytes already read skipped. So a reader never sees a byte twice
and the sample order is the one a local copy gives. After `retries` reopens, or at once for a
missing file (HTTP 404) or a refusal (401, 403), it raises RemoteError. `public(where)` is the
form for messages: without query string, fragment or user:password (a token in a query string
reaches the server and no log).
"""

import io
import netrc
import os
import re
import shlex
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 414}  # retrying cannot help; 408, 429 and 5xx can
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteOptions:
    retries: int = 3  # reopens of one file after a failure, then RemoteError
    timeout: float = 60.0  # http(s): seconds without a byte before a read counts as failed
    backoff: float = 1.0  # seconds before the first reopen, doubled for each further one

    def __post_init__(self):
        if not (isinstance(self.retries, int) and self.retries >= 0):
            raise ValueError(f"data.remote_retries must be a whole number, 0 or more, got {self.retries!r}")
        if not self.timeout > 0:
            raise ValueError(f"data.remote_timeout must be above 0 seconds, got {self.timeout!r}")


DEFAULT_REMOTE = RemoteOptions()


class RemoteError(OSError):
    """A remote file could not be read. `missing`: the server says it does not exist; `permanent`:
    trying again cannot help (missing, refused, an unknown protocol, a backend not installed)."""

    def __init__(self, message: str, missing: bool = False, permanent: bool = False):
        super().__init__(message)
        self.message, self.missing, self.permanent = message, missing, permanent or missing

    def __str__(self) -> str:
        return self.message  # WebDataset appends its stream and URL to the args of errors it passes on


def is_remote(location) -> bool:
    return str(location).startswith("pipe:") or bool(_SCHEME.match(str(location)))


def location_of(location, name: str) -> str:
    """The file `name` inside the shard folder `location` (a query string stays at the end)."""
    location = str(location)
    if location.startswith("pipe:"):
        if "{name}" not in location:
            raise ValueError(f"the shard location {location!r} needs {{name}} where the file name goes, "
                             "e.g. 'pipe:aws s3 cp s3://bucket/shards/{name} -'")
        return location.replace("{name}", shlex.quote(name))  # the manifest's names never reach the shell unquoted
    if not _SCHEME.match(location):
        return str(Path(location) / name)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + quote(name)))


def public(location) -> str:
    """`location` as messages show it: no query string, fragment or user:password (also in the URLs
    of a pipe: command; a secret written into the command itself is shown, so keep it in a variable)."""
    location = str(location)
    if location.startswith("pipe:"):
        return scrub(location)
    if not _SCHEME.match(location):
        return location
    parts = urlsplit(location)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def folder_of(where) -> str:
    """The shard folder a file's location (as `public` gives it) lies in, for a `t2f shards verify` hint."""
    where = str(where)
    if where.startswith("pipe:"):
        return "SHARDS"  # the template cannot be recovered from one command
    return where.rsplit("/", 1)[0] if _SCHEME.match(where) else str(Path(where).parent)


def open_location(where, options: RemoteOptions = DEFAULT_REMOTE):
    """A binary stream over a local file, or a RetryingStream over a remote one."""
    return RetryingStream(str(where), options) if is_remote(where) else open(where, "rb")


def read_bytes(where, options: RemoteOptions = DEFAULT_REMOTE) -> bytes:
    with open_location(where, options) as stream:
        return stream.read()


class RetryingStream(io.RawIOBase):
    """Reads one remote file from start to end, reopening at the byte it reached after a failure.
    Once it has given up, every further read raises the same RemoteError (see `error`)."""

    def __init__(self, url: str, options: RemoteOptions):
        super().__init__()
        self.url, self.options = url, options
        self.position, self.size, self.failures, self.error = 0, None, 0, None
        self._source, self._process, self._stderr = None, None, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self.error:
                raise self.error
            try:
                if self._source is None:
                    self._open()
                n = self._source.readinto(buffer)
                if n == 0 and len(buffer):
                    self._check_complete()
                self.position += n
                return n
            except Exception as err:  # the backends raise their own kinds; _give_up_or_wait sorts them
                self._give_up_or_wait(err)

    def close(self) -> None:
        self._close_source()
        super().close()

    def _open(self) -> None:
        if self.url.startswith("pipe:"):
            self._source, self.size = self._run_command(), None
        elif self.url.startswith(("http://", "https://")):
            self._source, self.size = _open_http(self.url, self.position, self.options.timeout)
        else:
            self._source, self.size = _open_fsspec(self.url, self.position)

    def _run_command(self):
        self._stderr = tempfile.TemporaryFile()  # a pipe could fill up and stall the command
        self._process = subprocess.Popen(self.url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=self._stderr)
        _skip(self._process.stdout, self.position)
        return self._process.stdout

    def _check_complete(self) -> None:
        """At end of data: a short HTTP body or a failed command is a failure, not the end of the file."""
        if self.size is not None and self.position < self.size:
            raise ConnectionError(f"connection closed after {self.position} of {self.size} bytes")
        if self._process is not None and self._process.wait() != 0:
            self._stderr.seek(0)
            said = self._stderr.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise OSError(f"command exited with status {self._process.returncode}: {said[0][:300]}")

    def _give_up_or_wait(self, err) -> None:
        self._close_source()
        missing = isinstance(err, FileNotFoundError) or getattr(err, "code", None) in (404, 410)
        permanent = missing or _permanent(err)
        if permanent or self.failures >= self.options.retries:
            tries = "" if permanent else f"; gave up after {self.failures + 1} tries"
            self.error = RemoteError(f"{public(self.url)}: {_describe(err)}{tries}", missing, permanent)
            raise self.error
        time.sleep(self.options.backoff * 2 ** self.failures)
        self.failures += 1

    def _close_source(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()  # our own child: a re-run or an early close must not leave it behind
            self._process.wait()
        for stream in (self._source, self._stderr):
            if stream is not None:
                stream.close()
        self._source, self._process, self._stderr = None, None, None


def _permanent(err) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code in PERMANENT_HTTP
    return isinstance(err, (PermissionError, IsADirectoryError, NotADirectoryError, ImportError, ValueError))


def _describe(err) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    text = scrub(str(err))  # backends may quote the URL, query string and all
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def scrub(text: str) -> str:
    """`text` with every URL in it shown as `public` shows it."""
    return _URL_IN_TEXT.sub(lambda m: public(m.group(0)), text)


def _skip(source, count: int) -> None:
    """Read and drop `count` bytes (a server that ignores Range, a command run again)."""
    while count > 0:
        chunk = source.read(min(count, CHUNK))
        if not chunk:
            raise ConnectionError("the file ended before the point where the last try stopped")
        count -= len(chunk)


def _open_http(url: str, position: int, timeout: float):
    request = urllib.request.Request(url, headers={"Range": f"bytes={position}-"} if position else {})
    for key, value in _netrc_auth(urlsplit(url).hostname).items():
        request.add_unredirected_header(key, value)  # never sent on to the host a redirect names
    response = urllib.request.urlopen(request, timeout=timeout)
    length = response.headers.get("Content-Length")
    if position and response.status != 206:  # the server sent the whole file again
        _skip(response, position)
        return response, int(length) if length else None
    return response, position + int(length) if length else None


def _netrc_auth(host) -> dict:
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return {}
    if not entry:
        return {}
    return {"Authorization": "Basic " + b64encode(f"{entry[0]}:{entry[2]}".encode()).decode()}


def _open_fsspec(url: str, position: int):
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise ImportError(f"reading {public(url)} needs fsspec and its backend ({err}); "
                          "install them with `pip install 't2f[remote]'`") from None
    source = fs.open(path, "rb")
    source.seek(position)
    return source, source.size
