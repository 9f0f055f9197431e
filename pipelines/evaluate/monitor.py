"""k-NN of the student during pretraining (`cae2 pretrain --eval-every N --eval-data DIR`)."""

from __future__ import annotations

from pathlib import Path

from cae2.errors import UserError
from pipelines.evaluate.data import load_labelled
from pipelines.evaluate.knn import student_knn


class KnnMonitor:
    """k-NN top-1/top-5 (k = 20) of the student's CLS features; an `Evaluator` of `pipelines.pretrain`.
    The main process extracts and classifies while the others wait; nothing here uses a random
    generator or changes the model's state, so the run and its resumes go on exactly as without it."""

    def __init__(self, folder: str):
        root = Path(folder)
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise UserError(f"--eval-data {folder}: expected train/ and val/ folders (ImageFolder layout)")
        self.train = load_labelled(str(root / "train"), "--eval-data train/")
        self.val = load_labelled(str(root / "val"), "--eval-data val/", classes=self.train.classes)

    def __call__(self, model, accelerator) -> dict:
        record = {}
        if accelerator.is_main_process:
            top1, top5 = student_knn(accelerator.unwrap_model(model), self.train, self.val, 20, accelerator.device)
            record = {"knn_top1": top1, "knn_top5": top5, "knn_k": 20}
        accelerator.wait_for_everyone()
        return record
