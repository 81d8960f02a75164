"""A fresh process with no accord import: load an exported CLIPModel directory the way transformers users do.

Usage: python hf_clip_worker.py CLIP_DIR OUT.pt IMAGE... -- TEXT...
Writes {"text": [N, D], "image": [M, D], "clipscore": torchmetrics CLIPScore, "logit_scale": float}.
"""

import sys

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, CLIPModel

folder, out, *rest = sys.argv[1:]
split = rest.index("--")
images, texts = [Image.open(p) for p in rest[:split]], rest[split + 1 :]
model = CLIPModel.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
with torch.no_grad():
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, truncation=True)
    text = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    image = model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
assert "accord" not in sys.modules


class Features(torch.nn.Module):  # torchmetrics' callable route wants tensors from get_*_features
    def __init__(self, clip):
        super().__init__()
        self.clip, self.config = clip, clip.config

    def get_image_features(self, pixel_values):
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


from torchmetrics.multimodal.clip_score import CLIPScore  # noqa: E402

metric = CLIPScore(model_name_or_path=lambda: (Features(model), processor))
metric.update([torch.from_numpy(__import__("numpy").array(i.convert("RGB"))).permute(2, 0, 1) for i in images], texts)
torch.save(
    {
        "text": F.normalize(text, dim=-1),
        "image": F.normalize(image, dim=-1),
        "clipscore": metric.compute(),
        "logit_scale": model.logit_scale.item(),
    },
    out,
)
