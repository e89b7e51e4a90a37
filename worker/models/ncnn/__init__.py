"""ncnn models ported to torch: :mod:`.net` parses and runs a ``.param``/``.bin`` pair,
:mod:`.port` imports the packaged super-resolution models and verifies them against ncnn."""

from worker.models.ncnn.net import (
    Layer,
    NcnnNet,
    NcnnSR,
    UnsupportedLayer,
    load_ncnn_state,
    parse_param,
    read_weights,
)
from worker.models.ncnn.port import (
    NCNN_MODELS,
    NcnnModelSpec,
    build_from_ncnn,
    import_ncnn_models,
    model_from_json,
    ncnn_reference,
    package_dir,
    psnr,
    run_uint8,
    verification_image,
    verify_against_ncnn,
)
from worker.models.weights import file_sha256

__all__ = [
    "NCNN_MODELS", "Layer", "NcnnModelSpec", "NcnnNet", "NcnnSR", "UnsupportedLayer", "build_from_ncnn",
    "file_sha256", "import_ncnn_models", "load_ncnn_state", "model_from_json", "ncnn_reference",
    "package_dir", "parse_param", "psnr", "read_weights", "run_uint8", "verification_image", "verify_against_ncnn",
]
