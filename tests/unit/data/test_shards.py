"""The shard format and its bad input: brace patterns, pipes, missing shards, broken samples.

Shards are written by the test (no network); `pipe:cat` stands in for an object-store command.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from shard_samples import png, shard_config, write_shards

from ssl.data.datamodule import PretrainDataModule
from ssl.data.datasets import DatasetNotFoundError, UnreadableImageError, build_dataset
from ssl.data.shard_urls import ShardNotFoundError, expand_urls, open_shard
from ssl.data.spec import ViewSpec
from ssl.data.tar_shards import iter_samples, split_key


def test_brace_patterns_spell_webdatasets_shard_lists() -> None:
    assert expand_urls("/d/train-{000008..000011}.tar") == [f"/d/train-{i:06d}.tar" for i in range(8, 12)]
    assert expand_urls("s{a,b}-{1..2}.tar") == ["sa-1.tar", "sa-2.tar", "sb-1.tar", "sb-2.tar"]
    assert expand_urls("a.tar::b-{0..1}.tar") == ["a.tar", "b-0.tar", "b-1.tar"]
    assert expand_urls(["x{1,2}.tar", "y.tar"]) == ["x1.tar", "x2.tar", "y.tar"]
    assert split_key("dir/n0144_1.seg.png") == ("dir/n0144_1", "seg.png")
    with pytest.raises(ValueError, match="unbalanced"):
        expand_urls("/d/train-{000..001.tar")


def test_shards_are_reproducible_and_read_by_webdataset(tmp_path: Path) -> None:
    first = write_shards(tmp_path / "a", count=7, per_shard=3)
    write_shards(tmp_path / "b", count=7, per_shard=3)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["index.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    ours = []
    for url in expand_urls(first):
        with open_shard(url) as stream:
            ours += [(key, sample["png"], sample["cls"]) for _, key, sample in iter_samples(stream, url)]
    assert [k for k, _, _ in ours] == [f"sample{i:06d}" for i in range(7)]
    assert ours[4][1] == png(4) and ours[4][2] == b"1"
    wds = pytest.importorskip("webdataset")
    theirs = [(s["__key__"], s["png"], s["cls"]) for s in wds.WebDataset(first, shardshuffle=False)]
    assert theirs == ours


def test_pipe_urls_read_like_files_and_name_a_failing_command(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, count=6, per_shard=3)
    cfg = OmegaConf.create(shard_config(f"pipe:cat {pattern}", index=str(tmp_path / "index.json")))
    piped = build_dataset(cfg, "pretrain")
    assert piped.sizes == [3, 3] and piped.urls[1] == f"pipe:cat {tmp_path}/train-000001.tar"
    assert [k for _, k, _ in piped.samples(1)] == ["sample000003", "sample000004", "sample000005"]
    assert piped[2][1] == 2  # previews come from the first shard
    with pytest.raises(ShardNotFoundError, match="pipe:cat /nonexistent.tar.*status"):
        with open_shard("pipe:cat /nonexistent.tar") as stream:
            stream.read()
    cfg.index = None
    with pytest.raises(DatasetNotFoundError, match="dataset.index=.*dataset.epoch_samples=N"):
        build_dataset(cfg, "pretrain")


def test_a_missing_shard_is_named_before_training(tmp_path: Path) -> None:
    write_shards(tmp_path, count=6, per_shard=3)
    cfg = OmegaConf.create(shard_config(str(tmp_path / "train-{000000..000002}.tar")))
    with pytest.raises(ShardNotFoundError, match="(?s)1 of the 3 shards.*train-000002.tar.*inclusive"):
        build_dataset(cfg, "pretrain")
    cfg.urls = None
    with pytest.raises(DatasetNotFoundError, match="dataset.urls is not set"):
        build_dataset(cfg, "pretrain")
    with pytest.raises(ValueError, match="valid names: .*hf.*webdataset"):
        build_dataset(OmegaConf.create({"name": "webdatasets"}), "pretrain")


def test_by_index_matches_the_stream_and_reports_broken_samples(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, count=9, per_shard=4, corrupt={6})
    data = build_dataset(OmegaConf.create(shard_config(pattern)), "train")
    assert (len(data), data.has_labels, data.num_classes) == (9, True, 3)
    image, label = data[5]
    assert label == 2 and image.size == (12, 12) and image.mode == "RGB"
    with pytest.raises(UnreadableImageError, match="train-000001.tar:sample000006.png"):
        data[6]
    unlabelled = build_dataset(OmegaConf.create(shard_config(pattern, label_key=None)), "train")
    assert unlabelled[5][1] == -1 and not unlabelled.has_labels


def test_a_truncated_shard_is_counted_and_the_epoch_keeps_its_length(tmp_path: Path) -> None:
    """Half of shard 1 is cut off: its samples after the cut and the shard itself are reported,
    the reader fills its quota from its other shards, nothing raises."""
    pattern = write_shards(tmp_path, count=24, per_shard=8)
    index = str(tmp_path / "index.json")
    shard = tmp_path / "train-000001.tar"
    with tarfile.open(shard) as archive:
        cut = archive.getmembers()[7].offset_data + 100  # inside sample 3's image
    shard.write_bytes(shard.read_bytes()[:cut])
    node = OmegaConf.create(shard_config(pattern, index=index, shuffle_buffer=4))
    data = PretrainDataModule(node, ViewSpec(global_crops=1), batch_size=4, num_workers=0,
                              dataset=build_dataset(node, "pretrain"))
    data.setup()
    loader = data.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    reported = [entry for b in batches for entry in b["unreadable"]]
    assert any("train-000001.tar" in path and "unreadable after 3 samples" in why for path, why in reported)
    assert all(b["views"][0].shape == (4, 3, 12, 12) and torch.isfinite(b["views"][0]).all() for b in batches)


@pytest.mark.parametrize("layout", ["pax", "gnu", "ustar", "gzip"])
def test_the_reader_agrees_with_tarfile_on_every_layout(tmp_path: Path, layout: str) -> None:
    """Long names (pax records, GNU long-name members, ustar prefixes), directories and metadata
    members skipped, gzip-compressed shards; skipping into a shard gives the same tail."""
    path = tmp_path / "shard.tar"
    fmt = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}.get(layout, tarfile.USTAR_FORMAT)
    names = ["d" * 120 + "/k1.jpg", "d" * 120 + "/k1.cls", "short/k2.png", "__meta__.json", "k3.seg.png"]
    with tarfile.open(path, "w:gz" if layout == "gzip" else "w", format=fmt) as archive:
        folder = tarfile.TarInfo("short")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            archive.addfile(info, io.BytesIO(name.encode()))
    with open(path, "rb") as stream:
        samples = [(k, {e: v.decode() for e, v in s.items()}) for _, k, s in iter_samples(stream, str(path))]
    assert samples == [("d" * 120 + "/k1", {"jpg": names[0], "cls": names[1]}),
                       ("short/k2", {"png": names[2]}), ("k3", {"seg.png": names[4]})]
    with open(path, "rb") as stream:
        assert [(o, k) for o, k, _ in iter_samples(stream, str(path), skip=2)] == [(2, "k3")]


def test_http_urls_stream_and_a_missing_one_is_named(tmp_path: Path) -> None:
    """A local HTTP server (127.0.0.1, no network) stands in for a shard host."""
    import functools
    import http.server
    import threading

    write_shards(tmp_path, count=6, per_shard=3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = OmegaConf.create(shard_config(f"{base}/train-{{000000..000001}}.tar",
                                            index=str(tmp_path / "index.json")))
        remote = build_dataset(cfg, "pretrain")
        assert [k for _, k, _ in remote.samples(1)] == ["sample000003", "sample000004", "sample000005"]
        with pytest.raises(ShardNotFoundError, match="train-000009.tar cannot be opened.*404"):
            with open_shard(f"{base}/train-000009.tar"):
                pass
    finally:
        server.shutdown()


def test_a_bare_brace_pattern_on_the_command_line_reaches_the_config_as_typed() -> None:
    from hydra import compose, initialize_config_dir

    from ssl.config import CONFIG_DIR
    from ssl.data.shard_urls import quote_url_overrides

    typed = ["dataset=webdataset", "dataset.urls=/data/train-{000000..000009}.tar", "seed=1"]
    quoted = quote_url_overrides(typed)
    assert quoted[0] == typed[0] and quoted[2] == typed[2]
    assert quote_url_overrides(quoted) == quoted  # already quoted: left alone
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=quoted)
    assert cfg.dataset.urls == "/data/train-{000000..000009}.tar"
