"""The data layer: datasets, augmented views and per-batch masks, knowing no method.

spec.py            the contract: ViewSpec, CropRecipe, BatchMasker, the batch keys
datasets.py        the dataset registry (raw PIL image + label)
photometric.py     one crop kind's colour augmentation and its random draws
pil_ops.py         PIL-side ops and tensor conversions the workers run
multicrop.py       global + local crops;  plain_crop.py: RandomResizedCrop + flip
pretrain_views.py  every view a set of objectives asks for, from one image
eval_transform.py  the deterministic evaluation transform
masking.py         token / block masks;  frequency.py: FFT masks (both BatchMaskers)
device_augment.py  the photometric half in batch on the device; device_crops.py: crops there
datamodule.py      the Lightning data module, the collate step, clean evaluation loaders
resumable_sampler.py  the seeded, resumable shuffle;  mixed_batch_sampler.py: L labelled per batch
labelled_split.py  which images keep their label (seeded, per class, recorded)
mixed_labels.py    a mixed run's pretraining set: labels of the split only, a folder's unlabelled pool
shards.py          dataset=webdataset: a shard list, its counts, decoding, a few images by index
shard_urls.py      brace patterns, opening local / http(s) / pipe: shards;  tar_shards.py: reading them
shard_writer.py    writing shards + index.json;  hf_dataset.py: dataset=hf (by index or streamed)
shard_stream.py    the stream: shards over ranks x workers, shuffle buffer, reader positions
stream_feed.py     the data module's side of a stream: its loader and its checkpoint entry
"""
