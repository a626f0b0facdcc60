"""``./run.sh submissions --refresh``: the competition's submissions, as Kaggle lists them,
matched to the manifests and their scores stored back into the upload records.

A listed submission is matched to a manifest by the Kaggle ref an upload record holds; else to
an upload record without a ref (the upload answered without one) by its message and time;
else to the manifest whose CSV has the uploaded file's name (``latest.csv``: the newest
manifest of that moment), made before the submission and of the uploaded size. Records are
edited through :func:`kit.submission.package.modify_manifest` only, so ``latest.json`` stays
in step and an interrupted refresh loses nothing.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from kit.submission import package
from kit.submission.credentials import find_credentials
from kit.submission.kaggle_client import KaggleSession
from kit.utils import KitError

PAGE_SIZE = 50
MAX_PAGES = 200  # 10 000 submissions: a guard against a server that repeats its pages
MESSAGE_WINDOW = timedelta(minutes=30)  # an upload record's time to Kaggle's date, at most
CLOCK_SLACK = timedelta(minutes=5)  # this machine's clock against Kaggle's
UNSCORED = ("pending", "submitted", "uploading", "timeout")


class ListingSession(KaggleSession):
    """A :class:`KaggleSession` that lists every submission of the competition, page by page
    (the client's ``competition_submissions`` returns only the first page)."""

    def list_all(self) -> list[dict]:
        """Each listed submission as ``ref``, ``description``, ``file_name``, ``date`` (aware
        UTC datetime), ``status``, ``public_score``, ``private_score``, ``error``,
        ``total_bytes``."""
        # The request type comes with the client, which load_kaggle_api() made importable.
        from kagglesdk.competitions.types.competition_api_service import (
            ApiListSubmissionsRequest,
        )

        out, token, seen = [], "", set()
        with self._gate("could not list the competition's submissions"):
            with self.api.build_kaggle_client() as kaggle:
                for _ in range(MAX_PAGES):
                    request = ApiListSubmissionsRequest()
                    request.competition_name = self.competition
                    request.page_size = PAGE_SIZE
                    request.page_token = token
                    if not token:
                        request.page = 1
                    response = kaggle.competitions.competition_api_client.list_submissions(
                        request)
                    page = [s for s in (response.submissions or []) if s is not None]
                    out += [self._plain(s) for s in page]
                    token = response.next_page_token or ""
                    if not page or not token or token in seen:
                        break
                    seen.add(token)
        return out

    def _plain(self, sub) -> dict:
        return {"ref": int(sub.ref) if sub.ref else None, "description": sub.description or "",
                "file_name": sub.file_name or "", "date": _aware(sub.date),
                "status": sub.status.name.lower(), "public_score": _score(sub.public_score),
                "private_score": _score(sub.private_score),
                "error": self._scrub(sub.error_description or "") or None,
                "total_bytes": sub.total_bytes}


def _score(value) -> float | None:
    """Kaggle sends scores as strings; an empty or odd one means not scored."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _aware(value) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _when(text) -> datetime | None:
    try:
        return _aware(text) if text else None
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- matching

def match(listed: list[dict], manifests: list[tuple[Path, dict]],
          competition: str) -> tuple[dict[Path, list[tuple[str | None, dict, str]]], list[dict]]:
    """Pair each listed submission with a manifest (and its upload record when it has one).

    Returns
    -------
    (matches, unmatched)
        ``{manifest path: [(record id or None, listed submission, how)]}`` (``how``: ``ref``,
        ``message and time``, ``file name and date``) and the listed submissions matched to
        none.
    """
    by_ref, unreffed = {}, []
    for path, m in manifests:
        for rec in m.get("submissions", []):
            if rec.get("competition") not in (None, competition):
                continue
            if rec.get("ref"):
                by_ref[int(rec["ref"])] = (path, rec)
            elif rec.get("status") != "failed":  # a failed upload never reached Kaggle
                unreffed.append((path, rec))
    matches: dict[Path, list] = {}
    unmatched, used = [], set()
    for sub in sorted(listed, key=lambda s: (s["date"] is None, s["date"] or 0)):
        found = by_ref.get(sub["ref"]) if sub["ref"] else None
        how = "ref"
        if found is None:
            found, how = _by_message(sub, unreffed, used), "message and time"
        if found is None:
            found = _by_file(sub, manifests)
            how = "file name and date"
        if found is None:
            unmatched.append(sub)
            continue
        path, rec = found
        if rec is not None:
            used.add(id(rec))
        matches.setdefault(path, []).append((rec.get("id") if rec else None, sub, how))
    return matches, unmatched


def _by_message(sub, unreffed, used):
    date = sub["date"]
    near = [(abs(t - date), path, rec) for path, rec in unreffed
            if id(rec) not in used and rec.get("message") == sub["description"] and date
            and (t := _when(rec.get("time"))) is not None and abs(t - date) <= MESSAGE_WINDOW]
    if not near:
        return None
    _, path, rec = min(near, key=lambda x: x[0])
    return path, rec


def _by_file(sub, manifests):
    """The manifest whose CSV was uploaded: same file name (``latest.csv``: the newest made
    before the upload), made before the submission, of the uploaded size when Kaggle says."""
    date, name = sub["date"], sub["file_name"]
    if date is None or not name:
        return None
    fits = []
    for path, m in manifests:
        made = _when(m.get("created_utc"))
        csv = path.with_name(m["files"]["csv"])
        if made is None or made > date + CLOCK_SLACK:
            continue
        if name not in (csv.name, f"{package.LATEST}.csv"):
            continue
        if sub.get("total_bytes") and csv.is_file() and csv.stat().st_size != sub["total_bytes"]:
            continue
        fits.append((name == csv.name, made, path))
    if not fits:
        return None
    named = [f for f in fits if f[0]]
    _, _, path = max(named or fits, key=lambda f: f[1])
    return path, None


# ----------------------------------------------------------------------------- storing

def store(matches: dict[Path, list], competition: str) -> int:
    """Write the listed status and scores into the upload records, one atomic edit per
    manifest; a submission found by file name gets a new record. Returns the records
    changed or added."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    changed = 0
    for path, items in matches.items():
        def change(manifest, items=items):
            nonlocal changed
            records = manifest.setdefault("submissions", [])
            for record_id, sub, how in items:
                rec = _find(records, record_id, sub["ref"])
                if rec is None:
                    rec = {"id": f"kaggle-{sub['ref']}", "time": _iso(sub["date"]),
                           "competition": competition, "message": sub["description"],
                           "csv": manifest["files"]["csv"], "csv_sha256": None}
                    records.append(rec)
                rec.update(_listed_fields(sub, now))
                rec.setdefault("matched_by", how)  # how it was first tied to Kaggle
                changed += 1

        package.modify_manifest(path, change)
    return changed


def _find(records: list[dict], record_id, ref) -> dict | None:
    for rec in records:
        if (record_id is not None and rec.get("id") == record_id) or (
                ref and rec.get("ref") == ref):
            return rec
    return None


def _listed_fields(sub: dict, now: str) -> dict:
    fields = {"ref": sub["ref"], "status": sub["status"], "listed": now,
              "kaggle_file": sub["file_name"] or None}
    for key in ("public_score", "private_score", "error"):
        if sub[key] is not None:
            fields[key] = sub[key]
    return fields


def _iso(date) -> str | None:
    return date.isoformat(timespec="seconds") if date else None


# ----------------------------------------------------------------------------- the command

def competitions(given: str | None, manifests: list[tuple[Path, dict]], task) -> list[str]:
    """The slugs to list: ``given`` (``-c``), else those the manifests and their upload
    records name, else the task's ``kaggle``."""
    if given:
        return [given]
    named = {m.get("competition") for _, m in manifests}
    named |= {r.get("competition") for _, m in manifests for r in m.get("submissions", [])
              if r.get("status") != "failed"}
    named.discard(None)
    if named:
        return sorted(named)
    slug = getattr(task, "kaggle", None)
    if not slug:
        raise KitError("no competition to list: pass -c SLUG (the part of the competition's "
                       "URL after /competitions/), or set kaggle: in the task file")
    return [slug]


def refresh(manifests: list[tuple[Path, dict]], competition: str, *, env=None,
            echo=print) -> dict:
    """List ``competition``'s submissions on Kaggle, match them and store their scores.

    Returns
    -------
    dict
        ``listed``, ``matched`` (by how), ``stored``, ``unmatched`` (the listed submissions
        matched to no manifest).

    Raises
    ------
    KitError
        No or unsafe credentials, or Kaggle refusing the listing (one scrubbed line).
    """
    if not competition:
        raise KitError("no competition to list: pass -c SLUG (the part of the competition's "
                       "URL after /competitions/), or set kaggle: in the task file")
    creds = find_credentials(env)
    echo(f"listing the submissions of {competition} (credentials from {creds.source})")
    listed = ListingSession(creds, competition).list_all()
    matches, unmatched = match(listed, manifests, competition)
    stored = store(matches, competition)
    hows: dict[str, int] = {}
    for items in matches.values():
        for _, _, how in items:
            hows[how] = hows.get(how, 0) + 1
    return {"listed": len(listed), "matched": hows, "stored": stored, "unmatched": unmatched}


def summary(result: dict, competition: str) -> list[str]:
    """What a refresh did, in lines."""
    n = sum(result["matched"].values())
    hows = ", ".join(f"{k} by {how}" for how, k in result["matched"].items())
    plural = "" if result["listed"] == 1 else "s"
    lines = [f"{competition}: {result['listed']} submission{plural} listed, {n} matched to "
             "manifests" + (f" ({hows})" if hows else "")]
    if result["unmatched"]:
        refs = ", ".join(f"{s['ref']} ({s['file_name'] or 'no file name'})"
                         for s in result["unmatched"][:10])
        more = len(result["unmatched"]) - 10
        lines.append(f"not matched to any manifest in submissions/: {refs}"
                     + (f" and {more} more" if more > 0 else "")
                     + " (uploaded from elsewhere, or their manifest was deleted)")
    return lines
