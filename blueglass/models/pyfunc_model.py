"""MLflow pyfunc model *defined from code*: loads a BlueGlass model folder through its adapter.

MLflow executes this file at load time (no cloudpickle). Base models take a DataFrame with an
``image_path`` column; SAEs and probes take activations (one column per dimension) and return SAE codes
or probe scores. A patched model (a folder with ``patch.json``) loads its base model and its SAE / probe
from the registry and runs the base model with the intervention hooked in. Output: for detectors one row per detection (``image_index, x0, y0, x1, y1, score, label``);
for zero-shot models, with ``params={"prompts": "a|b|c"}``, one row per image with the logits per prompt,
and without prompts the normalised image embedding.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel
from PIL import Image


class BlueGlassModel(PythonModel):
    def load_context(self, context):
        from pathlib import Path

        folder = Path(context.artifacts["model"])
        self.adapter = self.sae = self.probe = None
        self.patches = []
        if (folder / "patch.json").exists():
            import json

            from blueglass.features.patch import patch_from_spec

            doc = json.loads((folder / "patch.json").read_text())
            spec = doc["intervention"]
            self.adapter = mlflow.pyfunc.load_model(doc["base_uri"]).unwrap_python_model().adapter
            sae = (
                mlflow.pyfunc.load_model(spec["sae_uri"]).unwrap_python_model().sae
                if "sae_uri" in spec
                else None
            )
            direction = None
            if "probe_uri" in spec:
                probe = mlflow.pyfunc.load_model(spec["probe_uri"]).unwrap_python_model().probe
                direction = probe.direction(spec.get("target_class"))
            self.patches = [patch_from_spec(spec, sae=sae, direction=direction)]
        elif (folder / "sae_weights.safetensors").exists():
            from blueglass.interp.sae import SparseAutoencoder

            self.sae = SparseAutoencoder.load(folder).eval()
        elif (folder / "probe.safetensors").exists():
            from blueglass.interp.probes import ProbeResult

            self.probe = ProbeResult.load(folder)
        else:
            from blueglass.models import load_adapter

            self.adapter = load_adapter(folder)

    def predict(self, context, model_input, params=None):
        from blueglass.features.patch import FeaturePatcher

        if not self.patches:
            return self._predict(model_input, params)
        with FeaturePatcher(self.adapter, self.patches):
            return self._predict(model_input, params)

    def _predict(self, model_input, params=None):
        import torch

        if self.sae is not None or self.probe is not None:
            # interpretability models take activations: one column per input dimension
            feats = np.asarray(model_input, dtype=np.float32)
            if self.probe is not None:
                return pd.DataFrame(self.probe.predict(feats))
            with torch.no_grad():
                return pd.DataFrame(self.sae.encode(torch.from_numpy(feats)).numpy())

        paths = list(model_input["image_path"])
        images = [np.array(Image.open(p).convert("RGB")) for p in paths]
        with torch.no_grad():
            outputs = self.adapter.forward(self.adapter.preprocess(images))
            if self.adapter.task == "detection":
                dets = self.adapter.postprocess(outputs, [im.shape[:2] for im in images])
                names = dict(zip(self.adapter.category_ids, self.adapter.classes, strict=True))
                rows = [
                    {
                        "image_index": i,
                        "x0": b[0],
                        "x1": b[2],
                        "y0": b[1],
                        "y1": b[3],
                        "score": s,
                        "label": names[int(c)],
                    }
                    for i, d in enumerate(dets)
                    for b, s, c in zip(d.boxes_xyxy, d.scores, d.labels, strict=True)
                ]
                return pd.DataFrame(rows, columns=["image_index", "x0", "y0", "x1", "y1", "score", "label"])
            prompts = [p for p in ((params or {}).get("prompts") or "").split("|") if p]
            if not prompts:
                return pd.DataFrame(outputs.cpu().numpy())
            self.adapter.set_prompts(prompts)
            return pd.DataFrame(self.adapter.postprocess(outputs).numpy(), columns=prompts)


mlflow.models.set_model(BlueGlassModel())
