"""Benchmark training steps against the least work they need, in the same process.

`python -m ssl.benchmark objective=dino backbone=vit_t [any pretrain override] [bench.steps=20]`
`python -m ssl.benchmark bench.objectives=[dino,mae,dino+mfm] bench.backbones=[vit_t,resnet18]`

Least work: the student's forward + backward over the same crops (one pass per resolution,
backbone and the heads the teacher mirrors, summed output as loss) plus the teacher's forward on
the global crops (data2vec: on the unmasked plain view). The full step adds the objective's
loss, gradient clipping, the optimizer step and the EMA update. Synthetic crops of the
configured sizes isolate the model from the data pipeline, which is measured separately
(images/s of the view transform, one process).

Masked image modeling (MAE, MFM) uses one plain crop per image; there the reference is a
full-token forward + backward of the same encoder, so MAE's step / reference ratio shows what
encoding only the visible tokens saves. For MAE and data2vec 2.0 the encoder alone on its visible
tokens (data2vec 2.0: of all `clone_batch` copies) is timed too (`visible_encoder_s`).

Settings (`bench.<key>=<value>`; the other arguments are pretraining overrides):

- `objectives`, `backbones`: lists; one run per pair (`objective=<o> backbone=<b>` added to the
  other overrides; `dino+mfm` or `[dino,mfm]` is one composite). `objective.<name>.*`
  overrides reach only the runs that train `<name>` (with a plain `objective=...` too). A pair
  that fails (MAE on a ResNet) is a row with the reason; the call fails only when none ran.
- `isolate` (true): each run in a fresh process, since peak RSS (ru_maxrss) only grows over a
  process's life; on CUDA the peak allocation is reset per run either way.
- `precision`: auto (bf16 autocast on CUDA, float32 on CPU) | 32 | bf16 | fp16 (CUDA only,
  with a GradScaler as Lightning's 16-mixed).
- `real_data` (false): steps/s pulling batches from the real train loader (`data.num_workers`
  workers, pinned memory on CUDA, non-blocking copy, the data module's `on_after_batch_transfer`)
  vs the same steps on one batch already on the device; their ratio says whether the data
  pipeline keeps up.
- `json`, `markdown`: files for the list of rows and the table (both are also printed).
- `steps` (10), `warmup` (3), `data_pipeline` (true), `num_samples` (CoKe's label memory).

On CUDA with pynvml installed, GPU utilisation is sampled during the timed steps.
"""

from ssl.benchmark.cli import main
from ssl.benchmark.measure import benchmark
from ssl.benchmark.step import student_crops, synthetic_batch, training_step

__all__ = ["benchmark", "main", "student_crops", "synthetic_batch", "training_step"]
