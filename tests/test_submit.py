"""``./run.sh submit``: the real kaggle client against a local fake Kaggle server.

Paths that reach the network run the kit in a subprocess (the client fixes its endpoint at
import time); the checks made before any upload run in-process through ``kit.cli.main``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_kaggle import FakeKaggle, write_fake_submission
from kit.cli import main
from kit.submission import credentials, kaggle_client
from kit.utils import KitError, sha256_file

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("fake_kaggle.py")
USER, KEY = "kit-user", "kit-dummy-key-5f3a9c"
TOKEN = "KGAT_dummy-token-8d2e1b"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A work directory with a blended submission, and an empty home without credentials."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in [v for v in os.environ if v.startswith("KAGGLE_")] + ["XDG_CONFIG_HOME"]:
        monkeypatch.delenv(var, raising=False)
    write_fake_submission(tmp_path / "work", n_test=5, nested=0.41, in_sample=0.47)
    return tmp_path / "work"


def _env(workdir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(PYTHONPATH=str(REPO), NO_ALBUMENTATIONS_UPDATE="1",
               HOME=str(workdir.parent / "home"))
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def run_kit(server: FakeKaggle, workdir: Path, *args, **env) -> subprocess.CompletedProcess:
    """``./run.sh submit ...`` in a subprocess whose kaggle client talks to ``server``."""
    cmd = [sys.executable, str(LAUNCHER), server.url, "submit", *args,
           "--workdir", str(workdir), "--data", str(workdir / "data")]
    return subprocess.run(cmd, env=_env(workdir, **env), capture_output=True, text=True,
                          timeout=60, cwd=workdir)


def manifest(workdir: Path, name="latest.json") -> dict:
    return json.loads((workdir / "submissions" / name).read_text())


def assert_no_secret(*texts):
    for text in texts:
        for secret in (KEY, TOKEN):
            assert secret not in text


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- uploads

def test_round_trip_wait_records_ref_and_score(workdir):
    csv = workdir / "submissions" / "latest.csv"
    sent = csv.read_bytes()
    with FakeKaggle(username=USER, key=KEY, pending_polls=1) as server:
        proc = run_kit(server, workdir, "-m", "blend v1 + biases", "--wait",
                       "--poll-interval", "0.1", KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    assert proc.returncode == 0, proc.stderr
    assert len(server.submissions) == 1
    sub = server.submissions[0]
    assert sub["data"] == sent
    assert sub["description"] == "blend v1 + biases"
    assert sub["competition"] == "an2dl2526c2v2"
    assert [c["json"]["fileName"] for c in server.calls("StartSubmissionUpload")] == ["latest.csv"]
    assert len(server.calls("ListSubmissions")) == 2  # pending, then complete
    score_line = next(line for line in proc.stdout.splitlines() if "public score" in line)
    assert "public score 0.4321" in score_line and "nested CV macro F1 0.410" in score_line
    assert "in-sample 0.4700" in score_line
    # latest.json and the timestamped manifest it mirrors both hold the record
    for name in ("latest.json", "20250101T000000Z_blend.json"):
        records = manifest(workdir, name)["submissions"]
        assert len(records) == 1
        rec = records[0]
        assert rec["ref"] == 1001 and rec["status"] == "complete"
        assert rec["public_score"] == pytest.approx(0.4321)
        assert rec["message"] == "blend v1 + biases" and rec["competition"] == "an2dl2526c2v2"
    assert csv.read_bytes() == sent
    assert_no_secret(proc.stdout, proc.stderr,
                     (workdir / "submissions" / "latest.json").read_text())


def test_access_token_and_explicit_csv_without_manifest(workdir, tmp_path):
    """Bearer token login; a CSV with no manifest is checked against --data and logged beside."""
    own = tmp_path / "mine.csv"
    own.write_bytes((workdir / "submissions" / "latest.csv").read_bytes())
    with FakeKaggle(username=USER, key="unused", token=TOKEN) as server:
        proc = run_kit(server, workdir, str(own), "-m", "by hand", "--competition", "other-comp",
                       KAGGLE_API_TOKEN=TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert server.submissions[0]["competition"] == "other-comp"
    assert server.submissions[0]["data"] == own.read_bytes()
    log = json.loads((tmp_path / "mine.submissions.json").read_text())
    assert log["submissions"][0]["ref"] == 1001 and log["submissions"][0]["status"] == "submitted"
    assert manifest(workdir)["submissions"] == []
    assert_no_secret(proc.stdout, proc.stderr, json.dumps(log))


def test_rejected_token_systemexit_becomes_one_line_error(workdir):
    """An expired token: the client's authenticate() calls exit(1); the kit reports it."""
    with FakeKaggle(token=TOKEN) as server:
        proc = run_kit(server, workdir, "-m", "old token", KAGGLE_API_TOKEN="KGAT_expired-0000")
    assert_one_line_error(proc, "Kaggle authentication failed", "KAGGLE_API_TOKEN")
    assert [r["path"].rsplit("/", 1)[-1] for r in server.requests] == ["IntrospectToken"]
    rec, = manifest(workdir)["submissions"]
    assert rec["status"] == "failed" and "authentication failed" in rec["error"]
    assert "KGAT_expired-0000" not in proc.stdout + proc.stderr + json.dumps(rec)
    assert "Authentication required" not in proc.stdout + proc.stderr  # the client's help text


def test_kaggle_json_in_config_dir(workdir, tmp_path):
    cfg = tmp_path / "kagglecfg"
    cfg.mkdir()
    (cfg / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    (cfg / "kaggle.json").chmod(0o600)
    with FakeKaggle(username=USER, key=KEY) as server:
        proc = run_kit(server, workdir, "-m", "from file", KAGGLE_CONFIG_DIR=str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert f"credentials from {cfg / 'kaggle.json'}" in proc.stdout
    assert len(server.submissions) == 1
    assert_no_secret(proc.stdout, proc.stderr)


@pytest.mark.parametrize("mode, key, words", [
    ("ok", "wrong-key-77c1", ["HTTP 401", "KAGGLE_KEY"]),
    ("quota", KEY, ["submission limit reached", "HTTP 400"]),
    ("quota_message", KEY, ["did not accept", "Submission allowance"]),
    ("upload_fail", KEY, ["did not accept", "Could not submit to competition", "upload"]),
])
def test_upload_errors_exit_nonzero_keep_csv_and_are_recorded(workdir, mode, key, words):
    csv = workdir / "submissions" / "latest.csv"
    before = csv.read_bytes()
    with FakeKaggle(username=USER, key=KEY, mode=mode) as server:
        proc = run_kit(server, workdir, "-m", "try", KAGGLE_USERNAME=USER, KAGGLE_KEY=key)
    assert_one_line_error(proc, *words, "CSV is kept")
    assert server.submissions == []
    assert csv.read_bytes() == before
    rec, = manifest(workdir)["submissions"]
    assert rec["status"] == "failed" and words[0] in rec["error"]
    assert manifest(workdir, "20250101T000000Z_blend.json")["submissions"] == [rec]
    assert_no_secret(proc.stdout, proc.stderr, json.dumps(rec))
    assert key not in proc.stdout + proc.stderr + json.dumps(rec)


def test_secrets_scrubbed_from_server_errors_and_client_output(workdir):
    """A server error echoing the key, with the client's verbose header dump switched on."""
    with FakeKaggle(username=USER, key=KEY, mode="leak") as server:
        proc = run_kit(server, workdir, "-m", "leak", KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY,
                       VERBOSE="1")
    assert_one_line_error(proc, "HTTP 400", "bad request: key ***, header Basic ***")
    assert_no_secret(proc.stdout, proc.stderr, json.dumps(manifest(workdir)))
    assert "Authorization" not in proc.stdout + proc.stderr


def test_scoring_error_with_wait(workdir):
    with FakeKaggle(username=USER, key=KEY, mode="score_error", pending_polls=0) as server:
        proc = run_kit(server, workdir, "-m", "bad", "--wait", "--poll-interval", "0.1",
                       KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    assert_one_line_error(proc, "could not score", "4 expected")
    rec, = manifest(workdir)["submissions"]
    assert rec["status"] == "error" and rec["ref"] == 1001


# ----------------------------------------------------------------------------- before upload
# These never import the client, so they run in-process; a fake server is still up to prove
# that nothing is sent.

def _cli(workdir, *args) -> int:
    return main(["submit", *args, "--workdir", str(workdir), "--data", str(workdir / "data")])


def test_dry_run_checks_everything_but_sends_nothing(workdir, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    with FakeKaggle() as server:
        assert _cli(workdir, "-m", "dry", "--dry-run") == 0
    out = capsys.readouterr()
    assert server.requests == []
    assert "5 rows valid" in out.out and "dry run" in out.out and "an2dl2526c2v2" in out.out
    assert manifest(workdir)["submissions"] == []
    assert_no_secret(out.out, out.err)


def test_missing_credentials_is_one_line_and_recorded(workdir, capsys):
    assert _cli(workdir, "-m", "no creds") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Kaggle credentials found" in err[0] and "KAGGLE_KEY" in err[0]
    rec, = manifest(workdir)["submissions"]
    assert rec["status"] == "failed" and "no Kaggle credentials" in rec["error"]


def test_world_readable_kaggle_json_refused_with_chmod_fix(workdir, capsys):
    cfg = Path(os.environ["HOME"]) / ".kaggle"
    cfg.mkdir()
    (cfg / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    (cfg / "kaggle.json").chmod(0o644)
    assert _cli(workdir, "-m", "unsafe") == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and f"chmod 600 {cfg / 'kaggle.json'}" in err[0]
    assert_no_secret(out.out, out.err, json.dumps(manifest(workdir)))
    assert manifest(workdir)["submissions"][0]["status"] == "failed"


def test_invalid_csv_refused_before_upload(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    bad = tmp_path / "bad.csv"
    lines = (workdir / "submissions" / "latest.csv").read_text().splitlines()
    bad.write_text("\n".join(lines[:-1] + ["img_0004.png,Luminal C"]) + "\n")
    assert _cli(workdir, str(bad), "-m", "bad") == 2
    err = capsys.readouterr().err
    assert "not uploaded" in err and "unknown label 'Luminal C'" in err
    assert not (tmp_path / "bad.submissions.json").exists()


def test_edited_latest_csv_refused(workdir, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    csv = workdir / "submissions" / "latest.csv"
    csv.write_text(csv.read_text().replace("Luminal A", "Luminal B"))
    assert _cli(workdir, "-m", "edited", "--dry-run") == 2
    assert "changed since ./run.sh blend" in capsys.readouterr().err


def test_rows_checked_against_manifest_without_data(workdir, tmp_path, monkeypatch, capsys):
    """Without test_data/ the manifest's test-set hash decides; a missing row is caught."""
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    args = ["submit", "-m", "x", "--dry-run", "--workdir", str(workdir), "--data",
            str(tmp_path / "nowhere")]
    assert main(args) == 0
    assert "5 rows valid" in capsys.readouterr().out
    sub = workdir / "submissions"
    short = sub / "short.csv"
    short.write_text("\n".join(sub.joinpath("latest.csv").read_text().splitlines()[:-1]) + "\n")
    manifest_ = manifest(workdir)
    manifest_["csv_sha256"] = sha256_file(short)
    (sub / "short.json").write_text(json.dumps(manifest_))
    assert main(args[:1] + [str(short)] + args[1:]) == 2
    assert "not the 5 test images the blend saw" in capsys.readouterr().err


# ----------------------------------------------------------------------------- units

def test_find_credentials_order_and_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".kaggle").mkdir()
    env = {"KAGGLE_USERNAME": USER, "KAGGLE_KEY": KEY}
    creds = credentials.find_credentials(env)
    assert creds.source == "KAGGLE_USERNAME/KAGGLE_KEY" and KEY in creds.secrets
    assert credentials.scrub(f"boom {KEY} at\nline two", creds.secrets) == "boom *** at line two"
    assert credentials.find_credentials({"KAGGLE_API_TOKEN": TOKEN}).source == "KAGGLE_API_TOKEN"
    with pytest.raises(KitError, match="no Kaggle credentials found"):
        credentials.find_credentials({})
    token_file = tmp_path / ".kaggle" / "access_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o640)
    with pytest.raises(KitError, match=r"chmod 600 .*access_token"):
        credentials.find_credentials({})
    token_file.chmod(0o600)
    creds = credentials.find_credentials({})
    assert creds.source == str(token_file) and creds.secrets == (TOKEN,)
    bad = tmp_path / "cfg"
    bad.mkdir()
    (bad / "kaggle.json").write_text('{"username": "u", "key": ' + KEY)  # truncated JSON
    (bad / "kaggle.json").chmod(0o600)
    with pytest.raises(KitError, match="kaggle.json: not valid JSON") as err:
        credentials.find_credentials({"KAGGLE_CONFIG_DIR": str(bad)})
    assert "not valid JSON" in str(err.value) and KEY not in str(err.value)


def test_http_reasons_are_one_line_with_a_fix():
    for code in (401, 403, 404, 429, 400, 500):
        reason = kaggle_client.http_reason(code, "detail", "an2dl2526c2v2")
        assert "\n" not in reason and f"HTTP {code}" in reason
    assert "rules" in kaggle_client.http_reason(403, "Forbidden", "c")
    assert "limit" in kaggle_client.http_reason(400, "Submission limit reached", "c")


def test_client_import_does_not_run_kaggle_init(tmp_path):
    """``kaggle/__init__`` would authenticate and print at import; the kit skips it."""
    code = ("import kit.submission.kaggle_client as s; cls = s.load_kaggle_api(); import sys; "
            "print(cls.__name__, hasattr(sys.modules['kaggle'], 'api') and "
            "not isinstance(sys.modules['kaggle'].api, cls))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO,
                          env=_env(tmp_path / "w", HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "KaggleApi True"
    assert "Authentication required" not in proc.stdout + proc.stderr
