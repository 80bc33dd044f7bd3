"""train-vision on an image folder on CUDA, as a user with a GPU runs it: bf16 autocast (the trainer's default
there), Kornia's augmentations and MixUp/CutMix on the device, the moving average, a checkpoint and its resume. Skips
without CUDA; the GPU check (benchmarks/gpu_check.py, part stack) runs it."""

import math

import pytest
import torch
from imagefolder import make_image_folder

from retentive.training import TrainConfig
from retentive.training.vision import VisionConfig, train_vision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU check runs it)")


@pytest.mark.parametrize("model", ["rmt-tiny", "vir-tiny"])
def test_folder_training_on_cuda_in_bf16_resumes(tmp_path, model):
    pytest.importorskip("kornia")
    folder = make_image_folder(tmp_path / "images", classes=3, train=8, val=4)
    vision = VisionConfig(model=model, data=str(folder), batch_size=6, epochs=None, image_size=32, eval_batch_size=6)
    config = TrainConfig(steps=4, warmup=1, eval_interval=2, ckpt_interval=2, ema_decay=0.9, device="cuda",
                         progress=False)  # fmt: skip
    train_vision(vision, config, tmp_path / "run", stop_at=3)
    resumed = train_vision(vision, config, tmp_path / "run", resume=True)
    assert resumed.trainer.step == 4 and next(resumed.model.parameters()).is_cuda
    assert resumed.trainer._autocast().fast_dtype == torch.bfloat16  # "auto" precision on CUDA
    assert all(math.isfinite(x) for x in resumed.result.losses)
    assert {"val_accuracy", "val_ema_accuracy"} <= resumed.result.eval.keys()
