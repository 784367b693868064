"""MLflow pyfunc model *defined from code*: loads a BlueGlass model folder through its adapter.

MLflow executes this file at load time (no cloudpickle). Input: a DataFrame with an ``image_path``
column. Output: for detectors one row per detection (``image_index, x0, y0, x1, y1, score, label``);
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
        from blueglass.models import load_adapter

        self.adapter = load_adapter(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        import torch

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
