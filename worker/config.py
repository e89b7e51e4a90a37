"""One settings object for every process, read from ``CATALOG_*`` environment variables.

Defaults give the embedded mode (SQLite file, filesystem broker, CPU) so that a fresh
checkout runs with no servers; pointing ``CATALOG_DATABASE_URL`` at Postgres and
``CATALOG_BROKER_URL`` at Redis switches to production with no code change.

This file is longer than the ~450 lines the rest of ``worker/`` keeps to, on purpose: it is the
one settings object, every field with the description that ``catalog config`` prints, and the
validators that turn a wrong value into one sentence naming its variable. Split by topic, the
one place an operator reads would be scattered.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "CATALOG_"

CommaList = Annotated[list[str], NoDecode]

# Every capability, in an order that respects their dependencies (tagging's embedding and
# category feed the duplicate and category-mismatch checks).
DEFAULT_STEPS = (
    "metadata", "tagging", "detection", "segmentation",
    # After segmentation and detection: embeds the product region for visual search.
    "embedding",
    "superres",
    "contact_info", "nsfw", "tamper", "category", "quality",
    # Last: its search holds advisory locks until the image's results commit.
    "duplicates",
)


#: The flag kinds a listing's fraud score weighs (CATALOG_FRAUD_WEIGHTS keys).
#: Dynamic batch size on CUDA when CATALOG_BATCH_MAX_SIZE is unset (1 on the CPU, where batching
#: measured slower); worker.models.runtime and the batched image task both read it.
CUDA_BATCH_DEFAULT = 8

FRAUD_FLAG_KINDS = ("duplicate_image", "contact_info", "nsfw", "tampered", "category_mismatch", "low_quality")

#: Settings that may be read from a file named by ``CATALOG_<NAME>_FILE`` (Docker/Kubernetes secrets).
SECRET_FILE_FIELDS = ("database_url", "broker_url", "redis_url", "api_secret",
                      "results_redis_url", "webhook_secret")  # the last two: outbound events


class ConfigError(RuntimeError):
    """A configuration value is missing or invalid; the message names the variable."""


class _SecretFilesSource(PydanticBaseSettingsSource):
    """Values of :data:`SECRET_FILE_FIELDS` read from the files ``CATALOG_<NAME>_FILE`` names
    (the file's content, trailing newline stripped), so secrets need not sit in the environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        environ = {key.upper(): value for key, value in os.environ.items()}
        values: dict[str, Any] = {}
        for name in SECRET_FILE_FIELDS:
            var = f"{ENV_PREFIX}{name.upper()}"
            path = environ.get(f"{var}_FILE")
            if not path:
                continue
            if environ.get(var):
                raise ConfigError(f"{var} and {var}_FILE are both set: keep only one of them")
            try:
                values[name] = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"{var}_FILE: cannot read {path} ({exc.strerror or exc})") from None
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # After the environment: a variable and its _FILE twin never both apply (refused above).
        return (init_settings, env_settings, _SecretFilesSource(settings_cls), dotenv_settings,
                file_secret_settings)

    # --- storage -------------------------------------------------------------------
    data_dir: Path = Field(
        Path(".catalog"),
        description="Directory for the embedded database, broker queue and artifacts.",
    )
    api_secret: SecretStr | None = Field(
        None,
        description="Key that signs review-service login sessions (32+ random bytes; the same in every "
        "`catalog api` process). Unset: each process makes its own, so logins end on restart.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL. Default: SQLite file <data_dir>/catalog.db. "
        "Production: postgresql+psycopg2://user@host/db",
    )
    artifact_dir: Path | None = Field(
        None, description="Where cutouts and enhanced images are written. Default <data_dir>/artifacts."
    )
    thumbnail_side: int = Field(
        640, ge=32, le=4096,
        description="Longest side, pixels, of the JPEG thumbnail the metadata step stores for every photo "
        "(what the review pages show; never upscaled).",
    )

    # --- messaging -----------------------------------------------------------------
    broker_url: str | None = Field(
        None,
        description="Celery broker. Default: filesystem queue under <data_dir>/broker "
        "(no server, shared by processes on one machine). Production: redis://host:6379/0",
    )
    redis_url: str | None = Field(
        None,
        description="Redis holding the event stream read by `catalog ingest`. "
        "Default: the broker URL when it is redis://, else redis://127.0.0.1:6379/0.",
    )
    events_stream: str = Field("catalog:events", description="Stream producers XADD events to.")
    events_group: str = Field("catalog-ingest", description="Consumer group used by `catalog ingest`.")
    dead_letter_stream: str = Field(
        "catalog:events:dead", description="Stream that receives invalid events with the reason."
    )
    ingest_claim_idle_ms: int = Field(
        60_000, ge=1000, description="Pending entries idle this long (a dead consumer) are claimed again."
    )
    ingest_dead_consumer_idle_ms: int = Field(
        600_000, ge=1000,
        description="A consumer with nothing pending and idle this long belongs to a dead catalog ingest "
        "and is removed from the group.",
    )
    visibility_timeout: int = Field(
        7200,
        ge=10,
        description="Seconds before an unacknowledged task is redelivered (Redis broker). "
        "Must exceed the longest task.",
    )
    restore_sweep_seconds: int = Field(
        60, ge=1, description="How often a Redis-broker worker looks for unacknowledged tasks "
        "older than the visibility timeout (those of a dead worker) to redeliver."
    )
    task_time_limit: int = Field(3600, ge=5, description="Hard time limit of one task, seconds.")
    max_attempts: int = Field(
        3, ge=1, description="Attempts per image before it is failed (a worker that died counts)."
    )
    fetch_retries: int = Field(2, ge=0, description="Retries of an image whose host timed out or was unreachable.")
    fetch_retry_delay: int = Field(10, ge=0, description="Seconds before the first such retry (doubles each time).")
    images_per_task: int = Field(
        8, ge=1, le=64,
        description="Images of one listing event sent in one image task (one claim and one store "
        "transaction for all of them, one message). 1: one task per image (a listing's images spread "
        "over several worker processes: lower latency for a lone listing, more overhead per image).",
    )
    stale_after: int = Field(
        900, ge=10,
        description="Images pending this long that no run holds (their message was lost) are re-queued "
        "by the sweep.",
    )
    lease_seconds: int = Field(
        120, ge=10,
        description="How long the run analysing an image holds it without renewing (it renews every "
        "quarter of this). An image whose lease ran out (its worker died or hangs) is re-queued by the "
        "sweep every worker runs.",
    )
    lease_sweep_seconds: int = Field(
        30, ge=1,
        description="How often every `catalog worker` looks for images whose lease ran out, seconds.",
    )
    db_retry_for: int = Field(
        900, ge=0,
        description="Seconds a task keeps retrying while the database is unreachable (exponential "
        "backoff with full jitter, at most 60 s apart) before it gives up; an image left pending "
        "then is re-queued by the stale sweep.",
    )

    # --- outbound events: listing.processed (worker/outbound/, docs/events.md#results) -------
    results_stream: str = Field(
        "catalog:results", description="Redis stream that receives a `listing.processed` event per finished "
        "or re-scored listing."
    )
    results_maxlen: int = Field(
        1_000_000, ge=0,
        description="Approximate length the results stream is trimmed to (XADD MAXLEN ~); 0 = never trimmed.",
    )
    results_redis_url: str | None = Field(
        None,
        description="Redis that receives the results stream. Default: with a redis:// broker, the Redis of "
        "the event stream (CATALOG_REDIS_URL, else the broker); with the embedded broker: off (local runs "
        "need no Redis). `off` turns publishing off.",
    )
    webhook_url: str | None = Field(
        None,
        description="http(s) URL that is POSTed every `listing.processed` event (signed with "
        "CATALOG_WEBHOOK_SECRET). It must pass the image-fetch address checks: a private or loopback "
        "target needs CATALOG_FETCH_ALLOW_HOSTS. Unset: no webhook.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key of the webhook's X-Catalog-Signature header; required with "
        "CATALOG_WEBHOOK_URL.",
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds one webhook POST may take in all.")
    webhook_retries: int = Field(
        8, ge=0,
        description="Retries of a failed webhook POST (exponential backoff from 2 s, at most "
        "CATALOG_WEBHOOK_RETRY_MAX apart) before the event is dead-lettered.",
    )
    webhook_retry_max: int = Field(
        600, ge=1, description="Longest wait between two webhook retries, seconds."
    )
    outbox_retention_days: int = Field(
        7, ge=1,
        description="Outbox rows already published (and delivered or dead-lettered) are deleted after "
        "this many days by the beat sweep.",
    )

    # --- compute -------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present, else CPU.")
    steps: CommaList = Field(
        default_factory=lambda: list(DEFAULT_STEPS),
        description="Comma-separated analysis steps run on every image, in order.",
    )

    # --- image fetching --------------------------------------------------------------
    fetch_connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to an image host.")
    fetch_read_timeout: float = Field(15.0, gt=0, description="Seconds between bytes while downloading.")
    fetch_total_timeout: float = Field(60.0, gt=0, description="Seconds for the whole download.")
    fetch_max_bytes: int = Field(30 * 1024 * 1024, gt=0, description="Largest image file accepted, bytes.")
    fetch_max_redirects: int = Field(3, ge=0, description="Redirects followed (each one re-checked).")
    fetch_allow_hosts: CommaList = Field(
        default_factory=list,
        description="Private/loopback addresses allowed anyway: IPs or CIDRs, optionally with :port "
        "(e.g. 10.0.0.0/8,127.0.0.1:8080).",
    )
    fetch_allow_dirs: CommaList = Field(
        default_factory=list,
        description="Directories local image paths and file:// URLs may be read from (comma-separated; "
        "default: none, so events cannot read the worker's files). Symlinks are resolved before the "
        "check; /proc, /sys, /dev and non-regular files are refused anyway. `catalog process` and "
        "`catalog demo` add the paths they are given.",
    )
    max_pixels: int = Field(50_000_000, gt=0, description="Largest decoded image accepted, pixels.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    # --- observability: logs and metrics (worker/observe, docs/operations.md#monitoring) -----
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or json: one JSON object per line with the keys ts, level, "
        "logger, msg and the line's structured fields (event_id, listing, image_id, ...). Applies to "
        "every catalog process, Celery worker children included.",
    )
    metrics_port: int = Field(
        0, ge=0, le=65535,
        description="Port on which `catalog worker` and `catalog ingest` serve Prometheus /metrics "
        "(one server in the worker's parent process, summing its pool processes); 0 = off. "
        "`catalog api` serves GET /metrics on its own port regardless.",
    )
    metrics_dir: Path | None = Field(
        None,
        description="Directory for prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR); "
        "each process family gets a subdirectory, wiped when it starts. Default <data_dir>/metrics.",
    )
    worker_task_events: bool = Field(
        True,
        description="`catalog worker` sends Celery task events (what Flower shows; same as -E). "
        "false = off.",
    )

    # --- fraud -----------------------------------------------------------------------
    duplicate_max_distance: int = Field(
        14, ge=0, le=40,
        description="Duplicate photo: largest pHash+dHash Hamming distance (of 128 bits, best view "
        "pair) accepted on hashes alone.",
    )
    duplicate_max_distance_confirmed: int = Field(
        22, ge=0, le=60,
        description="Duplicate photo: largest distance accepted when the embedding cosine confirms.",
    )
    duplicate_confirm_cosine: float = Field(
        0.85, ge=-1, le=1, description="Embedding cosine that confirms a looser hash match."
    )
    duplicate_veto_cosine: float = Field(
        0.3, ge=-1, le=1, description="Embedding cosine below which a hash match is rejected."
    )
    duplicate_probe_neighbours: bool = Field(
        False,
        description="Also probe 16-bit bands one bit away: guarantees finding hashes up to 7 bits "
        "apart (3 without), at 17x the index probes (~15x slower lookups at 1M rows).",
    )
    duplicate_max_candidates: int = Field(200, ge=1, description="Candidates verified per image.")
    contact_min_confidence: float = Field(
        0.5, ge=0, le=1, description="OCR confidence below which a text line is ignored."
    )
    nsfw_threshold: float = Field(0.8, ge=0, le=1, description="open_nsfw score that raises an nsfw flag.")
    tamper_ela_threshold: float = Field(
        20.0, gt=0,
        description="Error-level-analysis ratio (strongest block vs median block) above which a "
        "JPEG is flagged as possibly edited (weak evidence). Untouched sample photos reach 3-15, "
        "so lower values flood the queue.",
    )
    quality_min_side: int = Field(250, ge=1, description="Images with a shorter side are low quality.")
    quality_blur_threshold: float = Field(
        40.0, ge=0, description="Variance of the Laplacian (grey 0..255, 512 px) below which an image is blurred."
    )
    quality_min_jpeg_quality: int = Field(
        30, ge=1, le=100, description="Estimated JPEG quality below which compression is extreme."
    )
    category_mismatch_min_score: float = Field(
        0.5, ge=0, le=1, description="Tagging confidence needed before a category mismatch is flagged."
    )
    flag_claim_ttl: int = Field(1800, ge=10, description="Seconds a reviewer holds a claimed flag.")
    label_heldout_percent: int = Field(
        20, ge=0, le=100,
        description="Share of reviewed labels held out for evaluating retrained models (fixed per "
        "image when its first label is stored).",
    )
    fraud_weights: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=lambda: {
            "duplicate_image": 0.6, "contact_info": 0.5, "nsfw": 0.7, "tampered": 0.15,
            "category_mismatch": 0.25, "low_quality": 0.05,
        },
        description="Per flag kind weight in the listing fraud score (JSON object).",
    )
    fraud_review_threshold: float = Field(
        0.5, ge=0, le=1, description="Listing fraud score from which the listing needs review."
    )
    fraud_block_threshold: float = Field(
        0.85, ge=0, le=1, description="Listing fraud score from which the listing should be held."
    )

    # --- models (vision runtime, tagging, detection, segmentation; see docs/vision.md) -------
    batch_max_size: int | None = Field(
        None, ge=1,
        description="Dynamic batching: most images per forward pass (1 = no batching). Default: "
        "8 on CUDA, 1 on CPU, where batching measured slower than one image per forward.",
    )
    batch_timeout_ms: float = Field(
        10.0, ge=0, description="Dynamic batching: longest wait for more images after the first, ms."
    )
    torch_threads: int | None = Field(
        None, ge=1,
        description="Torch intra-op CPU threads per worker process (default: torch's, = cores). "
        "With N worker processes on C cores use C/N; oversubscribed OpenMP is many times slower.",
    )
    # --- runtime backends and the GPU path (perf-runtime, issue 14; docs/gpu.md) -------
    onnx_backend: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto",
        description="Engine for the models that ship as ONNX graphs (U2-Netp segmentation, "
        "open_nsfw, PP-OCR det/cls/rec): auto = onnxruntime on the CPU (measured 1.5-3x faster "
        "there), torch (onnx2torch) on CUDA, where batching and autocast pay; or force one.",
    )
    autocast_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16",
        description="Torch models on CUDA run under autocast to this dtype (float32 = no autocast); "
        "ignored on the CPU. bfloat16 needs a GPU that supports it (Ampere or newer).",
    )
    tagging_top_k: int = Field(5, ge=1, description="ImageNet labels kept per image.")
    tagging_min_score: float = Field(0.05, ge=0, le=1, description="Lowest ImageNet label probability kept.")
    category_min_score: float = Field(
        0.10, ge=0, le=1, description="Lowest catalog-category score kept as a tag."
    )
    taxonomy_path: Path | None = Field(
        None, description="Catalog categories as ImageNet class lists. Default: worker/data/taxonomy.yaml."
    )
    category_head_path: Path | None = Field(
        None,
        description="Trained category head (torch file: Linear(1280, n) state_dict + classes). "
        "When set it replaces the taxonomy map.",
    )
    # --- retraining (worker/training, docs/training.md) ---------------------------------------
    promote_margin: float = Field(
        0.02, ge=0, le=1,
        description="A retrained model is promoted only if better than the champion by this much on "
        "the held-out labels (accuracy, or log loss for the fraud scorer) and no per-class recall "
        "drops by more.",
    )
    retrain_schedule: str = Field(
        "0 3 * * *",
        description='When beat starts a retrain: crontab "minute hour day-of-month month '
        'day-of-week" (UTC); empty = never.',
    )
    backfill_after_promote: bool = Field(
        False,
        description="After a retrain promotes a model, enqueue `catalog backfill --model NAME` for it "
        "(re-analyses images analysed with an older version; train queue).",
    )
    detector: str = Field(
        "yolov3-tiny", description='Object detector: "yolov3-tiny" or "torchvision:<builder>".'
    )
    detector_checkpoint: Path | None = Field(
        None, description="Weights for a torchvision:<builder> detector (state_dict file)."
    )
    detector_input_size: int = Field(
        416, ge=32, multiple_of=32, description="YOLO letterbox size, pixels (multiple of 32)."
    )
    detection_score_threshold: float = Field(0.25, ge=0, le=1, description="Lowest detection score kept.")
    detection_nms_iou: float = Field(0.45, gt=0, le=1, description="IoU above which NMS drops a box.")
    segmenter: str = Field(
        "u2netp", description='Foreground segmenter: "u2netp" or "torchvision:<builder>".'
    )
    segmenter_checkpoint: Path | None = Field(
        None, description="Weights for a torchvision:<builder> segmenter (state_dict file)."
    )
    segmenter_input_size: int = Field(320, ge=32, description="Segmenter input size, pixels.")
    colour_clusters: int = Field(4, ge=1, le=12, description="k of the k-means over foreground colours.")
    colour_min_share: float = Field(
        0.08, ge=0, le=1, description="Smallest share of the foreground a colour needs to become a tag."
    )
    cutout_compress: bool = Field(
        True,
        description="Deflate the cutout PNG (ISA-L: ~2-4 ms of CPU per megapixel of cutout; "
        "~10-16 ms with stdlib zlib where the isal package is missing). false: stored without "
        "compression, the same pixels in files 5-18x larger; with ISA-L no faster (~3 ms, "
        "the copy and checksums), so only worth it without isal.",
    )

    # --- super-resolution (worker/superres.py; see docs/superres.md) ------------------------
    sr_min_side: int = Field(
        512, ge=1, description="Super-resolve images whose shorter side is below this, pixels."
    )
    sr_target_side: int | None = Field(
        None, ge=1,
        description="Shorter side the enhanced image should reach; the smallest model scale that "
        "reaches it is used (x2, else x4). Default: sr_min_side.",
    )
    sr_model: Literal["auto", "waifu2x-photo", "realesrgan-x4plus", "inhouse"] = Field(
        "auto",
        description="SR model. auto = waifu2x-photo when x2 reaches the target, else "
        "realesrgan-x4plus (falling back to the in-house model when a model is not imported).",
    )
    sr_tile: int = Field(192, ge=16, description="SR tile size (input pixels, excluding overlap).")
    sr_tile_overlap: int | None = Field(
        None, ge=0,
        description="Input pixels of context each SR tile gets from its neighbours. Default per "
        "model: 8 for waifu2x and the in-house model, 32 for Real-ESRGAN (its receptive field is "
        "wide: 16 px left visible seams, 32 px matches an untiled run to > 50 dB).",
    )
    sr_model_dir: Path | None = Field(
        None, description="Imported/trained SR weights (`catalog models import`). Default <data_dir>/models."
    )

    # --- visual search index (issue 11, worker/search/; see docs/search.md) -------------------
    search_backend: Literal["auto", "pgvector", "embedded", "off"] = Field(
        "auto",
        description="Vector index for visual search: pgvector (Postgres with the vector extension, "
        "HNSW cosine), embedded (usearch files under CATALOG_SEARCH_DIR), off (no index, no "
        "search vectors stored), auto = pgvector when the database has it, else embedded.",
    )
    search_embedding: Literal["region", "full"] = Field(
        "region",
        description="Which stored vector a query uses and searches: region (the product crop: "
        "segmentation box, else main detection; images without one fall back to full) or full "
        "(the whole photo). See docs/benchmarks.md, Visual search.",
    )
    search_dir: Path | None = Field(
        None, description="Where the embedded index files live. Default <data_dir>/search."
    )
    search_ef_search: int = Field(
        200, ge=10, le=1000,
        description="HNSW candidate list size at query time (pgvector hnsw.ef_search, usearch "
        "expansion_search): higher is better recall and slower queries.",
    )
    # --- search for users: POST /analyze, search by photo (issue 11; docs/search-usage.md) ------
    analyze_rate_per_minute: int = Field(
        30, ge=0,
        description="Photos one API user may send to POST /api/v1/analyze and /api/v1/search/image per "
        "minute (each runs the models); more are answered 429 with Retry-After. 0 = no limit. Counted "
        "in each `catalog api` process's memory.",
    )

    @field_validator("steps", "fetch_allow_hosts", "fetch_allow_dirs", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("fetch_allow_hosts")
    @classmethod
    def _check_allow_hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_allow_entry(entry)
        return value

    @field_validator("fetch_allow_dirs")
    @classmethod
    def _check_allow_dirs(cls, value: list[str]) -> list[str]:
        # Resolved once here so a later chdir or a swapped symlink cannot widen the allowance.
        resolved = []
        for entry in value:
            path = Path(entry).expanduser()
            if not path.is_dir():
                raise ValueError(f"{entry!r} is not an existing directory")
            resolved.append(str(path.resolve()))
        return resolved

    @field_validator("database_url")
    @classmethod
    def _check_db_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        # A driver-less Postgres URL would make SQLAlchemy import psycopg (v3), which is not
        # installed: use the psycopg2 driver the project ships with.
        for bare in ("postgresql://", "postgres://"):
            if value.startswith(bare):
                return "postgresql+psycopg2://" + value[len(bare):]
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg2:// URL")
        return value

    @field_validator("fraud_weights", mode="before")
    @classmethod
    def _parse_fraud_weights(cls, value: object) -> object:
        # Decoded here rather than by the settings source so that bad JSON is reported as
        # this field's error, naming CATALOG_FRAUD_WEIGHTS.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not a JSON object of flag kind -> weight ({exc})") from None
        return value

    @field_validator("fraud_weights")
    @classmethod
    def _check_fraud_kinds(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(FRAUD_FLAG_KINDS))
        if unknown:
            raise ValueError(f"unknown flag kind(s) {', '.join(unknown)}; valid kinds: {', '.join(FRAUD_FLAG_KINDS)}")
        return value

    @field_validator("detector")
    @classmethod
    def _check_detector(cls, value: str) -> str:
        return _check_model_name(value, "yolov3-tiny")

    @field_validator("segmenter")
    @classmethod
    def _check_segmenter(cls, value: str) -> str:
        return _check_model_name(value, "u2netp")

    @field_validator("taxonomy_path", "category_head_path", "detector_checkpoint", "segmenter_checkpoint")
    @classmethod
    def _check_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @field_validator("onnx_backend")
    @classmethod
    def _check_onnx_backend(cls, value: str) -> str:
        # perf-runtime: a forced engine that is not installed could never run a model.
        needs = {"onnxruntime": "onnxruntime", "torch": "onnx2torch"}.get(value)
        if needs is not None and not _installed(needs):
            raise ValueError(f"{value} is forced but the {needs!r} package is not installed; use auto")
        return value

    @field_validator("results_redis_url")
    @classmethod
    def _check_results_redis_url(cls, value: str | None) -> str | None:
        # outbound events: `off`, or a Redis URL.
        if value is None or value.strip().lower() in ("", "off"):
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// or rediss:// URL, or off")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_url(cls, value: str | None) -> str | None:
        # outbound events: the address itself is checked when it is posted to (it may change in DNS).
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not embed credentials; the request is signed with CATALOG_WEBHOOK_SECRET")
        return value

    @model_validator(mode="after")
    def _webhook_needs_secret(self) -> Settings:
        # outbound events: an unsigned webhook could not be told apart from a forged one.
        if self.webhook_url and (self.webhook_secret is None or not self.webhook_secret.get_secret_value()):
            raise ValueError("CATALOG_WEBHOOK_SECRET (or CATALOG_WEBHOOK_SECRET_FILE) is required when "
                             "CATALOG_WEBHOOK_URL is set")
        return self

    @model_validator(mode="after")
    def _visibility_covers_tasks(self) -> Settings:
        # Redis would hand a still-running task to a second worker otherwise.
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}) must exceed task_time_limit "
                f"({self.task_time_limit}): set CATALOG_VISIBILITY_TIMEOUT above CATALOG_TASK_TIME_LIMIT"
            )
        return self

    # --- derived values --------------------------------------------------------------
    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"

    @property
    def effective_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def effective_sr_model_dir(self) -> Path:
        return (self.sr_model_dir or self.data_dir / "models").resolve()

    @property
    def effective_sr_target_side(self) -> int:
        return self.sr_target_side or self.sr_min_side

    @property
    def effective_metrics_dir(self) -> Path:
        return (self.metrics_dir or self.data_dir / "metrics").resolve()

    @property
    def effective_results_redis_url(self) -> str | None:
        """Where `listing.processed` events are XADDed, or None when the results stream is off
        (outbound events): an explicit CATALOG_RESULTS_REDIS_URL; else, with a Redis broker, the
        Redis of the event stream (CATALOG_REDIS_URL, else the broker); with the embedded broker:
        off, so local runs never need Redis."""
        value = (self.results_redis_url or "").strip()
        if value.lower() == "off":
            return None
        if value:
            return value
        if self.embedded_broker:
            return None
        return self.effective_redis_url

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def embedded_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")

    @property
    def effective_redis_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        if self.effective_broker_url.startswith(("redis://", "rediss://")):
            return self.effective_broker_url
        return "redis://127.0.0.1:6379/0"


def parse_allow_entry(entry: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]:
    """Parse ``10.0.0.0/8``, ``127.0.0.1:8080`` or ``[::1]:8080`` into (network, port)."""
    text, port = entry.strip(), None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        text = host
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        text, port_text = text.split(":")
        port = int(port_text)
    try:
        return ipaddress.ip_network(text, strict=False), port
    except ValueError as exc:
        raise ValueError(f"{entry!r} is not an IP, CIDR or IP:port") from exc


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (perf-runtime)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _check_model_name(value: str, builtin: str) -> str:
    if value == builtin or (value.startswith("torchvision:") and value.partition(":")[2].strip()):
        return value
    raise ValueError(f"unknown model {value!r}; use {builtin!r} or 'torchvision:<builder>'")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        if item["loc"]:
            field = str(item["loc"][0])
            shown = item.get("input")
            if field in ("api_secret", "webhook_secret"):
                shown = "**********"
            elif isinstance(shown, str):
                shown = redact_url(shown)  # a refused URL may still carry a password
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{ENV_PREFIX}{field.upper()}: {message} (got {shown!r})")
        else:
            lines.append(item["msg"].removeprefix("Value error, "))
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings; raise ConfigError naming each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:  # a complex value the environment source could not decode
        match = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{match.group(1).upper()}" if match else "settings"
        cause = exc.__cause__ or exc
        raise ConfigError(f"invalid configuration:\n  {name}: {cause}") from None


def redact_url(value: str) -> str:
    """``value`` with the password of a URL replaced by ``***`` (for output and logs)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.password is None:
        return value
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def reset_settings() -> None:
    """Forget cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
