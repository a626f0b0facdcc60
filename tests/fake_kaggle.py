"""A small fake Kaggle API server for the submit tests, and a launcher for the kit against it.

``FakeKaggle`` serves, on 127.0.0.1 and a free port, the few calls the real kaggle client
(2.2.5) makes to submit a file and to follow its scoring:

- ``POST /api/v1/security.OAuthService/IntrospectToken`` (access-token login),
- ``POST /api/v1/competitions.CompetitionApiService/StartSubmissionUpload`` ->
  ``{"token", "createUrl"}``, then ``PUT`` of the file to ``createUrl``,
- ``POST .../CreateSubmission`` -> ``{"message": "Successfully submitted ...", "ref"}``,
- ``POST .../ListSubmissions`` -> the submissions, newest first: each upload ``PENDING`` for
  ``pending_polls`` calls, then ``COMPLETE`` with a public score (and ``private_score`` when
  given, as after the competition's end), then those of ``listed`` (made earlier, as given);
  in pages of the request's ``pageSize`` (at most ``page_size``) with a ``nextPageToken``.

``mode`` makes it fail the way Kaggle does: ``quota`` (HTTP 400 with a JSON error on
CreateSubmission), ``quota_message`` (HTTP 200 whose message reports the limit),
``upload_fail`` (the PUT answers 500), ``score_error`` (scoring ends in ``ERROR``),
``leak`` (a CreateSubmission error that echoes the key and the auth header). Wrong
credentials get 401 on every API call. The server stops itself after ``lifetime_s`` seconds
or ``max_requests`` requests, so a hung test never leaves it running.

The client picks its endpoint when it is imported, so the kit runs in a subprocess:
``python tests/fake_kaggle.py <server url> <kit arguments...>`` points kagglesdk's LOCAL
endpoint at the server and runs ``kit.cli.main``.
"""
from __future__ import annotations

import base64
import json
import os
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API = "/api/v1/"
COMPETITIONS = API + "competitions.CompetitionApiService/"
MODES = ("ok", "quota", "quota_message", "upload_fail", "score_error", "leak")


class FakeKaggle:
    """Fake Kaggle API on ``self.url``; use as a context manager.

    Parameters
    ----------
    username, key : str
        The legacy API credentials it accepts (HTTP basic auth).
    token : str, optional
        An access token it accepts (bearer auth, checked by IntrospectToken).
    mode : str
        One of ``MODES``.
    pending_polls : int
        How many ListSubmissions calls see a new submission still pending.
    public_score : str
        The score reported once scoring is complete.
    private_score : str, optional
        The private score reported beside it (a competition that has ended); None: none.
    listed : list of dict, optional
        Submissions made before, listed after the uploads as given: ``ref``, ``description``,
        ``fileName``, ``date`` (ISO, UTC), ``status`` (default ``COMPLETE``), and optionally
        ``publicScore``, ``privateScore``, ``totalBytes``, ``errorDescription``.
    page_size : int, optional
        The most submissions one ListSubmissions page holds, whatever the client asks.
    """

    def __init__(self, username="kit-user", key="kit-dummy-key", token=None, mode="ok",
                 pending_polls=1, public_score="0.43210", lifetime_s=60.0, max_requests=200,
                 private_score=None, listed=None, page_size=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.username, self.key, self.token, self.mode = username, key, token, mode
        self.pending_polls, self.public_score = pending_polls, public_score
        self.private_score, self.listed = private_score, [dict(s) for s in listed or []]
        self.page_size = page_size
        self.lifetime_s, self.max_requests = lifetime_s, max_requests
        self.requests: list[dict] = []   # every request: method, path, json (if any)
        self.uploads: dict[str, bytes] = {}  # blob token -> uploaded bytes
        self.submissions: list[dict] = []  # accepted CreateSubmission calls
        self._lock = threading.Lock()
        self._server = None
        self._timer = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeKaggle":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self) -> "FakeKaggle":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def calls(self, method: str) -> list[dict]:
        """The requests made to one API method, e.g. ``calls("CreateSubmission")``."""
        return [r for r in self.requests if r["path"].rsplit("/", 1)[-1] == method]

    # -- request handling (called from the handler thread) -----------------------------------
    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        kind, _, value = header.partition(" ")
        if kind == "Basic":
            expected = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
            return value == expected
        return kind == "Bearer" and self.token is not None and value == self.token

    def answer(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict | None]:
        with self._lock:
            record = {"method": method, "path": path}
            if method == "POST":
                record["json"] = json.loads(body or b"{}")
            self.requests.append(record)
            if len(self.requests) > self.max_requests:
                threading.Thread(target=self.stop, daemon=True).start()
                return 503, {"code": 503, "message": "fake server: too many requests"}
            if method == "PUT" and path.startswith("/upload/"):
                return self._upload(path.rsplit("/", 1)[-1], body)
            if method != "POST" or not path.startswith(API):
                return 404, {"code": 404, "message": f"fake server: no route {method} {path}"}
            name = path.rsplit("/", 1)[-1]
            if name == "IntrospectToken":
                active = self.token is not None and record["json"].get("token") == self.token
                return 200, {"active": active, "username": self.username if active else ""}
            if not self.authorized(headers.get("Authorization")):
                return 401, {"code": 401, "message": "Unauthenticated"}
            route = {"StartSubmissionUpload": self._start_upload,
                     "CreateSubmission": self._create, "ListSubmissions": self._list}.get(name)
            if route is None:
                return 404, {"code": 404, "message": f"fake server: no method {name}"}
            return route(record["json"])

    def _start_upload(self, req):
        token = f"blob-{len(self.uploads) + 1}"
        self.uploads.setdefault(token, b"")
        return 200, {"token": token, "createUrl": f"{self.url}/upload/{token}"}

    def _upload(self, token, body):
        if token not in self.uploads:
            return 404, None
        if self.mode == "upload_fail":
            return 500, None
        self.uploads[token] = body
        return 200, None

    def _create(self, req):
        if self.mode == "leak":
            auth = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
            return 400, {"code": 400,
                         "message": f"bad request: key {self.key}, header Basic {auth}"}
        if self.mode == "quota":
            return 400, {"code": 400, "message": "Submission limit reached: 5 submissions per day"}
        if self.mode == "quota_message":
            return 200, {"message": "Your team has used its daily Submission allowance (5 of 5)",
                         "ref": 0}
        token = req.get("blobFileTokens")
        if not self.uploads.get(token):
            return 400, {"code": 400, "message": f"fake server: nothing uploaded for {token}"}
        ref = 1000 + len(self.submissions) + 1
        self.submissions.append({"ref": ref, "competition": req.get("competitionName"),
                                 "description": req.get("submissionDescription"),
                                 "data": self.uploads[token], "polls": 0,
                                 "date": datetime.now(timezone.utc).replace(tzinfo=None)})
        return 200, {"message": f"Successfully submitted to {req.get('competitionName')}",
                     "ref": ref}

    def _list(self, req):
        out = []
        for sub in reversed(self.submissions):
            if sub["competition"] != req.get("competitionName"):
                continue
            sub["polls"] += 1
            item = {"ref": sub["ref"], "description": sub["description"],
                    "fileName": "submission.csv", "status": "PENDING",
                    "date": sub["date"].isoformat(timespec="milliseconds") + "Z"}
            if sub["polls"] > self.pending_polls:
                if self.mode == "score_error":
                    item.update(status="ERROR",
                                errorDescription="Submission has 3 rows; 4 expected")
                else:
                    item.update(status="COMPLETE", publicScore=self.public_score)
                    if self.private_score is not None:
                        item.update(privateScore=self.private_score)
            out.append(item)
        out += [{"status": "COMPLETE", **sub} for sub in self.listed]
        return 200, self._page(out, req)

    def _page(self, items, req):
        """One page of ``items``: the offset is the page token, the size the smaller of the
        request's ``pageSize`` and ``page_size``."""
        sizes = [s for s in (req.get("pageSize"), self.page_size) if s]
        if not sizes:
            return {"submissions": items}
        start, size = int(req.get("pageToken") or 0), min(sizes)
        rest = start + size < len(items)
        return {"submissions": items[start:start + size],
                "nextPageToken": str(start + size) if rest else ""}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKaggle = None
    timeout = 10  # a stuck client connection must not block the server for long

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        status, payload = self.fake.answer(self.command, self.path, self.headers, self._body())
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_PUT = do_GET = _handle

    def log_message(self, *args):  # keep test output clean
        pass


def write_fake_submission(workdir, n_test: int = 5, nested: float = 0.41,
                          in_sample: float = 0.47, name: str = "blend", *, stem: str | None = None,
                          created_utc: str | None = None, runs=("tiny",), ci=None,
                          shakeup: dict | None = None, labels=None, oof=None,
                          latest: bool = True):
    """A submission as ``./run.sh blend`` leaves it, on a tiny made-up test set.

    Writes ``<workdir>/data/test_data/img_*.png`` (empty files: only the names matter),
    ``submissions/<stem>.csv`` + ``.json`` (built with ``kit.submission.package``; ``stem``
    default ``20250101T000000Z_<name>``) and, with ``latest``, the ``latest.csv``/``latest.json``
    copies. Returns the timestamped CSV path.

    The keywords shape the manifest: ``created_utc``; ``runs`` (backbone names, or
    ``{name: sha256 of its oof.csv}`` recorded as the blend's inputs); ``ci`` (the expected
    score's interval, with an ``expected_score`` record); ``shakeup`` (the manifest's key);
    ``labels`` (the CSV's predicted labels, default cycling through the classes); ``oof``
    (``(ids, labels, predictions)``: the nested OOF file ``<stem>.oof.csv``).
    """
    import shutil
    from pathlib import Path

    import pandas as pd

    from kit import CLASSES
    from kit.submission import package
    from kit.submission.shakeup import nested_oof_path, write_nested_oof

    workdir = Path(workdir)
    test_dir = workdir / "data" / "test_data"
    test_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"img_{i:04d}.png" for i in range(n_test)]
    for i in ids:
        (test_dir / i).write_bytes(b"")
    if labels is None:
        labels = [CLASSES[i % 4] for i in range(n_test)]
    df = pd.DataFrame({"sample_index": ids, "label": list(labels)})
    subs = workdir / "submissions"
    csv_path = subs / f"{stem or '20250101T000000Z_' + name}.csv"
    digest = package.write_submission(df, csv_path, ids, CLASSES)
    per_class = {c: 0.4 for c in CLASSES}
    hashes = dict(runs) if isinstance(runs, dict) else {bb: None for bb in runs}
    manifest = package.build_manifest(
        name=name, csv_path=csv_path, csv_sha256=digest, csv_rows=len(df), command="test",
        workdir=workdir, data_root=workdir / "data", train_labels_sha256="0" * 64,
        test_ids=ids, folds_sha256="1" * 64, outliers_sha256=None,
        backbones={bb: {"config": {}, "weights_source": "random", "oof_macro_f1": 0.4,
                        "folds_sha256": "1" * 64} for bb in hashes},
        inputs={f"runs/{bb}/oof.csv": sha for bb, sha in hashes.items() if sha},
        blend={"backbones": list(hashes), "objective": "macro_f1", "weight_views": False,
               "models": list(hashes), "weights": {bb: 1 / len(hashes) for bb in hashes},
               "biases": {c: 0.0 for c in CLASSES}, "params": {}, "seed": 42},
        scores={"nested": {"macro_f1": nested, "per_class_f1": per_class},
                "in_sample": {"macro_f1": in_sample, "per_class_f1": per_class},
                "baselines": {}},
        seed=42, created_utc=created_utc,
        expected_score=None if ci is None else {"macro_f1": nested, "honest": True,
                                                "label": "expected", "why": {}})
    if ci is not None:
        manifest["expected_ci95"] = list(ci)
    if shakeup is not None:
        manifest["shakeup"] = dict(shakeup)
    if oof is not None:
        write_nested_oof(nested_oof_path(csv_path), *oof)
    package.atomic_write_json(csv_path.with_suffix(".json"), manifest)
    if latest:
        shutil.copyfile(csv_path, subs / "latest.csv")
        shutil.copyfile(csv_path.with_suffix(".json"), subs / "latest.json")
    return csv_path


def main(argv: list[str]) -> int:
    """Run ``kit`` with the kaggle client pointed at the fake server at ``argv[0]``."""
    url, kit_args = argv[0], argv[1:]
    # The client reads these when imported: set them before anything imports it.
    os.environ["KAGGLE_API_ENVIRONMENT"] = "LOCALHOST"
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

    _env_to_endpoint[KaggleEnv.LOCAL] = url
    from kit.cli import main as kit_main

    return kit_main(kit_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
