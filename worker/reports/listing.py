"""What is stored for a listing, as a dict (for --json) and as readable text."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from db import models as m
from db.session import transaction
from worker.config import Settings
from worker.io.hashing import to_hex


def listing_report(settings: Settings, external_id: str) -> dict[str, Any]:
    with transaction(settings.effective_database_url) as session:
        listing = session.execute(
            select(m.Listing).where(m.Listing.external_id == external_id)
        ).scalar_one_or_none()
        if listing is None:
            raise LookupError(f"no listing with id {external_id!r}")
        images = []
        for img in listing.images:
            tags = session.execute(
                select(m.Tag).where(m.Tag.image_id == img.id).order_by(m.Tag.source, m.Tag.score.desc())
            ).scalars().all()
            dets = session.execute(
                select(m.Detection).where(m.Detection.image_id == img.id).order_by(m.Detection.score.desc())
            ).scalars().all()
            flags = session.execute(select(m.Flag).where(m.Flag.image_id == img.id)).scalars().all()
            arts = session.execute(select(m.ArtifactRecord).where(m.ArtifactRecord.image_id == img.id)).scalars().all()
            runs = session.execute(
                select(m.StepRunRecord).where(m.StepRunRecord.image_id == img.id).order_by(m.StepRunRecord.id)
            ).scalars().all()
            images.append({
                "id": img.id, "url": img.url, "status": img.status, "error": img.error,
                "complete": img.complete, "attempts": img.attempts,
                "incomplete_steps": [f"{r.step} {r.status}" for r in runs if r.status != "ok"],
                "width": img.width, "height": img.height, "format": img.format,
                "size_bytes": img.size_bytes, "sha256": img.sha256,
                "phash": to_hex(img.phash), "dhash": to_hex(img.dhash),
                "steps": [{"step": r.step, "model_version": r.model_version, "status": r.status,
                           "duration_ms": r.duration_ms, "error": r.error, "output": r.output}
                          for r in runs],
                "tags": [{"name": t.name, "score": round(t.score, 4), "source": t.source,
                          "model_version": t.model_version} for t in tags],
                "detections": [{"label": d.label, "score": round(d.score, 4),
                                "box": [round(v, 1) for v in (d.x0, d.y0, d.x1, d.y1)]} for d in dets],
                "flags": [{"id": f.id, "kind": f.kind, "score": round(f.score, 4), "status": f.status,
                           "evidence": f.evidence} for f in flags],
                "artifacts": [{"kind": a.kind, "path": a.path, "width": a.width, "height": a.height,
                               "model_version": a.model_version} for a in arts],
            })
        return {
            "listing": {"id": listing.external_id, "db_id": listing.id, "seller_id": listing.seller_id,
                        "title": listing.title, "category": listing.category, "status": listing.status,
                        "processed_at": listing.processed_at,
                        "fraud_score": listing.fraud_score, "fraud_decision": listing.fraud_decision},
            "images": images,
        }


def image_state(img: dict[str, Any]) -> str:
    """The image's status as shown: a done image whose analysis did not complete never reads
    as plain ``done``."""
    if img["status"] == "done" and img.get("complete") is False:
        return "done, incomplete: " + ", ".join(img.get("incomplete_steps") or ["steps missing"])
    return str(img["status"])


def problems(report: dict[str, Any]) -> tuple[int, int, int]:
    """(failed, incomplete, total) images of a report: what `catalog process` exits non-zero on."""
    images = report["images"]
    failed = sum(img["status"] == "failed" for img in images)
    incomplete = sum(img["status"] == "done" and img.get("complete") is False for img in images)
    return failed, incomplete, len(images)


def render_report(report: dict[str, Any]) -> str:
    lst = report["listing"]
    lines = [f"listing {lst['id']}  seller={lst['seller_id']}  category={lst['category'] or '-'}  "
             f"status={lst['status']}"]
    if lst.get("fraud_score") is not None:
        note = "  (not every image was fully analysed)" if lst["fraud_decision"] == "incomplete" else ""
        lines.append(f"fraud score {lst['fraud_score']:.2f} -> {lst['fraud_decision']}{note}")
    for img in report["images"]:
        lines.append("")
        lines.append(f"  image {img['id']}  [{image_state(img)}]  {img['url']}")
        if img["error"]:
            lines.append(f"    error: {img['error']}")
            continue
        if img["width"]:
            lines.append(f"    {img['width']}x{img['height']} {img['format']}  {img['size_bytes']} bytes  "
                         f"sha256 {img['sha256'][:16]}…  phash {img['phash']}  dhash {img['dhash']}")
        for run in img["steps"]:
            note = f"  ({run['error']})" if run["error"] else ""
            lines.append(f"    step {run['step']:<13} {run['status']:<11} {run['duration_ms']:8.1f} ms  "
                         f"{run['model_version']}{note}")
        by_source: dict[str, list[str]] = {}
        for tag in img["tags"]:
            by_source.setdefault(tag["source"], []).append(f"{tag['name']} {tag['score']:.2f}")
        for source, names in by_source.items():
            lines.append(f"    tags[{source}]: " + ", ".join(names[:8]))
        for det in img["detections"][:10]:
            lines.append(f"    box {det['label']} {det['score']:.2f} at {det['box']}")
        for art in img["artifacts"]:
            lines.append(f"    {art['kind']}: {art['path']} ({art['width']}x{art['height']})")
        for flag in img["flags"]:
            reason = flag["evidence"].get("summary") or flag["evidence"].get("reason") or ""
            lines.append(f"    FLAG {flag['kind']} score={flag['score']:.2f} [{flag['status']}] {reason}")
    return "\n".join(lines)
