import collections
import json
import os
import re
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from forecast_peft.cli import main
from forecast_peft.data.av2_reader import extract
from forecast_peft.data.cache import (
    INDEX_FILE,
    REPORT_FILE,
    DamagedShard,
    load_shard,
    open_split,
    read_shard_meta,
    read_skipped,
)
from forecast_peft.data.dataset import STATIC_SLOTS, ForecastDataset, collate_scenes, subset_indices
from forecast_peft.data.features import ACTOR_FEATURES, LANE_FEATURES
from forecast_peft.data.preprocess import cache_lock, ensure_cache, preprocess_split
from forecast_peft.errors import ConfigError, UserError


def _copy(sample_dir, root, name):
    dst = root / "val" / name
    shutil.copytree(sample_dir, dst)
    return dst


def _rewrite(scenario, fn):
    parquet = next(scenario.glob("*.parquet"))
    df = fn(pd.read_parquet(parquet))
    df.to_parquet(parquet)


def _truncate(scenario):
    parquet = next(scenario.glob("*.parquet"))
    parquet.write_bytes(parquet.read_bytes()[:2000])


def _corrupt(scenario):
    parquet = next(scenario.glob("*.parquet"))
    parquet.write_bytes(b"this is not parquet" * 100)


def _nest(scenario):
    """A split part unpacked into a folder of its own: scenario folders one level down."""
    inner = scenario / "inner"
    inner.mkdir()
    for path in scenario.glob("*.*"):
        path.rename(inner / path.name)


BAD = {
    "corrupt": (_corrupt, "unreadable parquet"),
    "truncated": (_truncate, "unreadable parquet"),
    "no_map": (lambda s: next(s.glob("*.json")).unlink(), "missing map file"),
    "no_focal": (lambda s: _rewrite(s, lambda df: df[df.track_id != "138951"]), "no focal track"),
    "focal_not_at_49": (
        lambda s: _rewrite(s, lambda df: df[~((df.track_id == "138951") & (df.timestep == 49))]),
        "not observed at step 49",
    ),
    "nan_positions": (
        lambda s: _rewrite(s, lambda df: df.assign(position_x=df.position_x.where(df.index != 5))),
        "NaN",
    ),
    "wrong_steps": (lambda s: _rewrite(s, lambda df: df[df.timestep < 100]), "wrong number of steps"),
    "nested": (_nest, "it holds scenario folders (inner/ and maybe more): AV2 keeps each scenario folder directly"),
}


@pytest.fixture(scope="module")
def bad_root(sample_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _copy(sample_dir, root, "good")
    for name, (damage, _) in BAD.items():
        damage(_copy(sample_dir, root, name))
    return root


def test_each_bad_scenario_is_skipped_with_its_reason(bad_root):
    summary = preprocess_split(bad_root, bad_root / "cache", "val", workers=1, progress=False)
    reasons = {p.split("/")[-1]: r for p, r in summary.skipped}
    assert summary.written == 1 and summary.read == len(BAD) + 1
    for name, (_, needle) in BAD.items():
        assert needle in reasons[name], (name, reasons.get(name))
    report = json.loads((bad_root / "cache" / "val" / REPORT_FILE).read_text())
    assert {r["path"].split("/")[-1] for r in report["skipped"]} == set(BAD)
    shards = open_split(bad_root / "cache", "val")
    assert [s.meta["scenario_id"] for s in shards] == [["0a1e6f0a-1817-4a98-b02e-db8c9327d151"]]


def test_a_split_of_scenarios_of_the_other_kind_says_so(sample_dir, tmp_path):
    """A val scenario (history and future) put in test/, and a test scenario (history alone) in
    val/: each is skipped saying what it looks like, and the empty split's error names it and its
    reason rather than asking for scenarios to be added."""
    (tmp_path / "test").mkdir()
    shutil.copytree(sample_dir, tmp_path / "test" / sample_dir.name)
    _rewrite(_copy(sample_dir, tmp_path, sample_dir.name), lambda df: df[df.timestep < 50])
    expected = {
        "test": "found 110 (from 0 to 109) (a scenario with its future, as train and val hold), expected 50 (0 to 49)",
        "val": "found 50 (from 0 to 49) (a test scenario), expected 110 (0 to 109)",
    }
    for split, steps in expected.items():
        summary = preprocess_split(tmp_path, tmp_path / "cache", split, workers=1, progress=False)
        ((path, reason),) = summary.skipped
        assert reason == f"wrong number of steps: {steps} for the {split} split"
        with pytest.raises(UserError) as err:
            open_split(tmp_path / "cache", split)
        assert f"none of the 1 under the data root could be read ({path}: {reason}; " in str(err.value)
        assert str(tmp_path / "cache" / split / REPORT_FILE) in str(err.value)


def test_cache_batch_equals_extract(sample_dir, tmp_path):
    _copy(sample_dir, tmp_path, sample_dir.name)
    preprocess_split(tmp_path, tmp_path / "cache", "val", progress=False)
    feats = extract(sample_dir)
    batch = ForecastDataset(tmp_path / "cache", "val").__getitems__([0])
    for key in ACTOR_FEATURES + LANE_FEATURES:
        np.testing.assert_array_equal(batch[key][0].numpy(), feats[key], err_msg=key)
    np.testing.assert_array_equal(batch["origin"].numpy(), feats["origin"])
    assert batch["scenario_id"] == [feats["scenario_id"]]


def test_incremental_and_interrupted(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "train", root / "train")
    cache = tmp_path / "cache"
    first = preprocess_split(root, cache, "train", shard_size=10, progress=False)
    assert first.written == 24 and len(list((cache / "train").glob("shard-*"))) == 3
    again = preprocess_split(root, cache, "train", shard_size=10, progress=False)
    assert again.read == 0 and again.already_cached == 24
    # a new scenario arrives; while it is processed the split must not read as complete
    extra = next((synth_root / "val").iterdir())
    shutil.copytree(extra, root / "train" / extra.name)
    (cache / "train" / INDEX_FILE).unlink()  # what an interrupted run leaves behind
    with pytest.raises(UserError, match="no complete cache"):
        ForecastDataset(cache, "train")
    third = preprocess_split(root, cache, "train", shard_size=10, progress=False)
    assert third.written == 1 and third.already_cached == 24
    assert len(ForecastDataset(cache, "train")) == 25


def test_a_full_disk_stops_preprocessing_in_one_line_and_keeps_the_shards_written(
    synth_root, tmp_path, capsys, monkeypatch
):
    """The second shard's write stops short (numpy's error on a full disk has no errno): one
    line names the shard and the way on, no temporary directory is left, and the next run caches
    the rest on top of the first shard (and removes what a killed run left half-written)."""
    from forecast_peft.data import cache as cache_module

    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(synth_root / "train", root / "train")
    real_save, calls = np.save, []

    def save(path, array):
        calls.append(path)
        if len(calls) > 16:  # a shard is 15 arrays; the second one fails in its second
            raise OSError("310640 requested and 102368 written")
        real_save(path, array)

    monkeypatch.setattr(cache_module.np, "save", save)
    args = ["preprocess", f"data.root={root}", f"data.cache_dir={cache}", "data.shard_size=10"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1].split("\r")[-1]  # after the progress bar
    assert "Traceback" not in err and line.startswith(
        f"fpeft: error: cannot write the cache shard {cache / 'train' / 'shard-00001'} "
        "(310640 requested and 102368 written; "
    )
    assert "set data.cache_dir= on a larger disk, then run again (the shards written so far stay)" in err
    assert sorted(p.name for p in (cache / "train").iterdir()) == ["shard-00000"]
    monkeypatch.setattr(cache_module.np, "save", real_save)
    killed = cache / "train" / ".tmp-shard-00001-99999"  # what a killed run leaves: removed by the next one
    killed.mkdir()
    (killed / "positions.npy").write_bytes(b"\x93NUMPY")
    summary = preprocess_split(root, cache, "train", shard_size=10, progress=False)
    assert summary.already_cached == 10 and summary.written == 14 and len(ForecastDataset(cache, "train")) == 24
    assert not killed.exists()


def test_a_full_disk_names_the_file_it_was_writing(monkeypatch, capsys):
    import errno

    from forecast_peft import stages

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpab12", None, "runs/x/checkpoints/last.ckpt")

    monkeypatch.setattr(stages, "runs", full)
    assert main(["runs", "runs_root=."]) == 1
    assert capsys.readouterr().err == (
        "fpeft: error: no space left on the device writing runs/x/checkpoints/last.ckpt: free some space, "
        "or write to a larger disk, and run again\n"
    )


def test_a_cache_that_cannot_be_written_says_where_to_put_it(synth_root, tmp_path, capsys, monkeypatch):
    """A data root on a read-only mount (a cluster's shared dataset): one line naming the cache
    and data.cache_dir=, instead of the bare OSError (a cache under a file: test_cli)."""
    import errno

    real_mkdir = Path.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(synth_root / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    # Path.mkdir, not os.mkdir: Python 3.10's pathlib holds its own reference to os.mkdir
    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["preprocess", f"data.root={synth_root}", f"data.cache_dir={synth_root / 'ro' / 'cache'}"]) == 1
    assert capsys.readouterr().err == (
        f"fpeft: error: cannot write the cache {synth_root / 'ro' / 'cache'} (Read-only file system): set "
        "data.cache_dir= to a folder you can write (the data root may stay read-only)\n"
    )


def test_files_outside_scenario_folders_are_named(synth_root, tmp_path, capsys):
    """A scenario's files unpacked without their folder are no scenario; preprocessing passed over
    them without a word (train: 1 scenario, and no more said)."""
    first, second = sorted((synth_root / "train").iterdir())[:2]
    shutil.copytree(first, tmp_path / "train" / first.name)
    for path in second.iterdir():
        shutil.copy(path, tmp_path / "train" / path.name)
    assert main(["preprocess", f"data.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "train: 1 scenario, read 1, written 1" in out
    assert (
        f"  not read: 2 files in {tmp_path / 'train'} outside scenario folders (such as "
        f"log_map_archive_{second.name}.json): AV2 keeps each scenario in a folder <id>/ with "
        "scenario_<id>.parquet and log_map_archive_<id>.json\n"
    ) in out


def test_padding_and_masks_of_a_batch(synth_root):
    ds = ForecastDataset(synth_root / "cache", "train")
    scenes = [ds[i] for i in range(4)]
    batch = collate_scenes(scenes)
    n = max(len(s["positions"]) for s in scenes)
    m = max(len(s["lane_positions"]) for s in scenes)
    assert batch["x"].shape == (4, n, 50, 2) and batch["lane_positions"].shape == (4, m, 20, 2)
    for i, s in enumerate(scenes):
        a, lanes = len(s["positions"]), len(s["lane_positions"])
        assert not batch["x_key_padding_mask"][i, :a].any() and batch["x_key_padding_mask"][i, a:].all()
        assert not batch["lane_key_padding_mask"][i, :lanes].any() and batch["lane_key_padding_mask"][i, lanes:].all()
        assert (batch["x"][i, a:] == 0).all()
    assert batch["x_padding_mask"].dtype == torch.bool


@pytest.mark.parametrize("static, multiple", [(True, 1), (False, 8), (False, 1)])
def test_rounded_batches_round_their_slots_up_and_carry_the_same_scenes(synth_root, static, multiple):
    """``static=True`` (for CUDA graphs): the actor and lane slots rounded up to multiples of
    ``STATIC_SLOTS``, no real-token indices (their lengths differ by batch). ``slot_multiple``
    (``data.slot_multiple``): the slots rounded up to multiples of it, the indices kept, naming
    the same real actors and lanes in the wider layout. Every other value as in the ordinary
    batch, the added slots padding; a multiple of 1 changes nothing."""
    ds = ForecastDataset(synth_root / "cache", "val")
    scenes = [ds[i] for i in range(5)]
    plain, rounded = collate_scenes(scenes), collate_scenes(scenes, static=static, slot_multiple=multiple)
    b, n = plain["x_key_padding_mask"].shape
    m = plain["lane_key_padding_mask"].shape[1]
    nn, mm = rounded["x_key_padding_mask"].shape[1], rounded["lane_key_padding_mask"].shape[1]
    slots = STATIC_SLOTS if static else (multiple, multiple)
    assert (nn % slots[0], mm % slots[1]) == (0, 0)
    assert n <= nn < n + slots[0] and m <= mm < m + slots[1]
    assert ((nn, mm) != (n, m)) == (static or multiple > 1)  # the scenes' sizes are not multiples already
    if static:
        assert "actor_index" in plain and "actor_index" not in rounded and "lane_index" not in rounded
        assert set(plain) - set(rounded) == {"actor_index", "lane_index"}
    else:
        assert set(plain) == set(rounded)
        for key, width, wider in (("actor_index", n, nn), ("lane_index", m, mm)):
            row, slot = plain[key] // width, plain[key] % width
            assert torch.equal(rounded[key], row * wider + slot), key
    for key, value in plain.items():
        if key in ("actor_index", "lane_index"):
            continue
        if not isinstance(value, torch.Tensor):
            assert rounded[key] == value
            continue
        got = rounded[key]
        if got.shape == value.shape:
            assert torch.equal(got, value), key
            continue
        lanes = key.startswith("lane_") or key == "is_intersections"
        real, width = (m, mm) if lanes else (n, nn)
        assert got.shape[1] == width, key
        assert torch.equal(got[:, :real], value), key
        padding = got[:, real:]
        assert padding.all() if key.endswith("padding_mask") else (padding == 0).all(), key


def test_train_fraction_subset_is_seeded(synth_root):
    a = ForecastDataset(synth_root / "cache", "train", fraction=0.25, seed=3).scenario_ids()
    b = ForecastDataset(synth_root / "cache", "train", fraction=0.25, seed=3).scenario_ids()
    c = ForecastDataset(synth_root / "cache", "train", fraction=0.25, seed=4).scenario_ids()
    assert a == b and len(a) == 6 and a != c
    assert len(subset_indices(1000, 0.01, 0)) == 10
    assert ForecastDataset(synth_root / "cache", "train", fraction=0.25, seed=3).total == 24


def test_training_says_how_much_data_it_uses(synth_root, capsys):
    from forecast_peft import config, stages

    stages._open_data(config.compose("tune", [f"data.root={synth_root}", "data.train_fraction=0.25"]))
    out = capsys.readouterr().out
    subset = "(data.train_fraction=0.25, data.subset_seed=2024)"
    assert f"data: 6 of 24 training scenarios {subset}, 16 for validation" in out


def test_cities_choose_the_scenes_of_a_split(synth_root, capsys):
    """``data.cities``: a run adapts to one city (or pre-trains without it), and eval scores it
    alone; a mistyped city fails in one line rather than train on nothing or on everything."""
    from forecast_peft import config, stages

    whole = ForecastDataset(synth_root / "cache", "train")
    city_of = dict(zip(whole.scenario_ids(), (whole[i]["city"] for i in range(len(whole)))))
    counts = collections.Counter(city_of.values())
    (first, n_first), (second, n_second) = counts.most_common(2)
    one = ForecastDataset(synth_root / "cache", "train", cities=[first])
    assert len(one) == n_first and one.total == 24 and one.cities == (first,)
    assert {city_of[i] for i in one.scenario_ids()} == {first}
    assert one.scenario_ids() == [i for i in whole.scenario_ids() if city_of[i] == first]  # in cache order
    two = ForecastDataset(synth_root / "cache", "train", cities=[second, first])
    assert len(two) == n_first + n_second
    assert {two[i]["city"] for i in range(len(two))} == {first, second}
    # a fraction of the city's scenes, seeded
    part = ForecastDataset(synth_root / "cache", "train", fraction=0.5, seed=3, cities=[first]).scenario_ids()
    assert len(part) == max(1, round(n_first * 0.5)) and set(part) <= set(one.scenario_ids())
    # a scenario another city holds, and one the split does not hold
    elsewhere = next(i for i, city in city_of.items() if city != first)
    assert one.city_left_out(elsewhere) == city_of[elsewhere]
    assert one.city_left_out(one.scenario_ids()[0]) is None and one.city_left_out("nowhere") is None
    assert whole.city_left_out(elsewhere) is None
    with pytest.raises(ConfigError) as err:
        ForecastDataset(synth_root / "cache", "train", cities=[first, first[:-1]])
    listing = ", ".join(f"{city} {n}" for city, n in sorted(counts.items()))
    assert str(err.value) == (
        f"data.cities: no scenario of the train split ({synth_root / 'cache' / 'train'}) is in '{first[:-1]}' "
        f"(did you mean '{first}'?); its cities: {listing}"
    )
    cfg = config.compose("tune", [f"data.root={synth_root}", f"data.cities=[{first}]", "data.train_fraction=0.5"])
    stages._open_data(cfg)
    val = ForecastDataset(synth_root / "cache", "val", cities=[first])
    expected = (
        f"data: {len(part)} of 24 training scenarios (data.cities=[{first}], data.train_fraction=0.5, "
        f"data.subset_seed=2024), {len(val)} of 16 for validation"
    )
    assert expected in capsys.readouterr().out
    assert stages.scenes_chosen(val) == f" (data.cities=[{first}]: {len(val)} of 16 scenarios)"
    assert stages.scenes_chosen(ForecastDataset(synth_root / "cache", "val")) == ""


def test_test_split_has_no_targets(synth_root):
    batch = ForecastDataset(synth_root / "cache", "test").__getitems__([0, 1])
    assert "y" not in batch
    assert batch["x_padding_mask"][..., 50:].all()


def test_a_moved_data_root_is_not_cached_twice(synth_root, tmp_path):
    root, cache = tmp_path / "here", tmp_path / "cache"
    shutil.copytree(synth_root / "train", root / "train")
    assert preprocess_split(root, cache, "train", progress=False).written == 24
    moved = root.rename(tmp_path / "there")  # the scenarios are known by their directory names
    again = preprocess_split(moved, cache, "train", progress=False)
    assert again.read == 0 and again.already_cached == 24
    assert len(ForecastDataset(cache, "train")) == 24


def test_stages_bring_the_cache_up_to_date(sample_dir, tmp_path, capsys):
    root, cache = tmp_path / "data", tmp_path / "cache"
    _copy(sample_dir, root, "a")
    _corrupt(_copy(sample_dir, root, "broken"))
    (root / "val" / ".ipynb_checkpoints").mkdir()  # hidden: no scenario, and not an unreadable one
    data = SimpleNamespace(root=str(root), cache_dir=str(cache), preprocess_workers=1, shard_size=512)
    ensure_cache(data, ["val"])  # never cached
    assert len(ForecastDataset(cache, "val")) == 1 and [s["path"] for s in read_skipped(cache, "val")] == [
        str(root / "val" / "broken")
    ]
    _copy(sample_dir, root, "b")  # added since
    ensure_cache(data, ["val"])
    assert len(ForecastDataset(cache, "val")) == 2
    assert "broken: unreadable parquet" in capsys.readouterr().out  # tried again with the new one, and reported
    ensure_cache(data, ["val"])  # nothing new: the unreadable one is not tried at every stage's start
    assert capsys.readouterr().out == "" and len(read_skipped(cache, "val")) == 1
    shutil.rmtree(root / "val" / "a")
    ensure_cache(data, ["val"])
    assert f"holds 1 scenario no longer under {root / 'val'} (such as a)" in capsys.readouterr().out
    assert len(ForecastDataset(cache, "val")) == 2
    shutil.rmtree(root / "val")  # a cache without its data root is used as it is
    ensure_cache(data, ["val"])
    assert len(ForecastDataset(cache, "val")) == 2
    with pytest.raises(UserError, match=f"no train split: {root / 'train'} does not exist and {cache / 'train'} holds"):
        ensure_cache(data, ["val", "train"])  # a stage that needs a split there is none of


def test_eval_and_predict_name_the_scenarios_they_could_not_read(sample_dir, tmp_path, capsys):
    root = tmp_path / "data"
    _copy(sample_dir, root, "good")
    _corrupt(_copy(sample_dir, root, "broken"))
    args = [f"data.root={root}", "data.num_workers=0", "data.preprocess_workers=1"]
    assert main(["eval", "--out", str(tmp_path / "report"), *args]) == 0
    out = capsys.readouterr().out
    assert "not scored: 1 scenario of split 'val' that could not be read" in out
    rows = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(r["scenes"], r["unscored"]) for r in rows] == [(1, 1)] * 3  # the three baselines
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"- {root / 'val' / 'broken'}: unreadable parquet" in md


def test_one_process_at_a_time_updates_the_cache(synth_root, tmp_path, capsys):
    """The processes of a multi-GPU run start together: the one that holds the cache's lock
    preprocesses, the others wait for it and then find nothing left to do."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(synth_root / "val", root / "val")
    data = SimpleNamespace(root=str(root), cache_dir=str(cache), preprocess_workers=1, shard_size=512)
    waiting = threading.Thread(target=ensure_cache, args=(data, ["val"]))
    with cache_lock(cache):  # another process is caching the split
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive()  # it waits for the lock ...
        assert "waiting for another process that is updating the cache" in capsys.readouterr().out
        preprocess_split(root, cache, "val", progress=False)  # ... while the holder does the work
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    assert "val: 16 scenarios" not in capsys.readouterr().out  # and then it finds nothing left to do
    assert len(ForecastDataset(cache, "val")) == 16 and len(list((cache / "val").glob("shard-*"))) == 1


def _scenes_by_id(dataset):
    """Copies: the dataset's scenes are views of memory-mapped files."""
    ids = dataset.scenario_ids()
    return {scenario_id: {k: np.array(v) for k, v in dataset[i].items()} for i, scenario_id in enumerate(ids)}


DAMAGE = {
    "an array cut short": (lambda s: os.truncate(s / "positions.npy", 1000), "positions.npy: "),
    "an array missing": (lambda s: os.remove(s / "theta.npy"), "theta.npy is missing"),
    "meta.json cut short": (lambda s: os.truncate(s / "meta.json", 20), "meta.json: "),
    "rows that do not fit": (lambda s: np.save(s / "x_attr.npy", np.zeros((3, 3))), "its actor arrays differ"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_cache_shard_is_named(synth_root, tmp_path, damage):
    shard = tmp_path / "shard"
    shutil.copytree(synth_root / "cache" / "val" / "shard-00000", shard)
    assert read_shard_meta(shard)["scenario_id"] == load_shard(shard).meta["scenario_id"]
    harm, problem = DAMAGE[damage]
    harm(shard)
    message = f"^{re.escape(str(shard))}: damaged cache shard \\({re.escape(problem)}"
    for read in (read_shard_meta, load_shard):  # the stale check's header check, and the dataset's maps
        with pytest.raises(DamagedShard, match=message):
            read(shard)


def _overwrite(path, rows, value):
    """Write ``value`` over rows of a cached .npy file in place, its size unchanged (a disk or a
    copy that changed bytes)."""
    array = np.load(path, mmap_mode="r+")
    array[rows] = value
    array.flush()


@pytest.mark.parametrize("chunk_rows", [1 << 14, 3])
def test_nan_and_inf_values_in_a_cached_shard_are_found_with_their_scenes(synth_root, tmp_path, chunk_rows):
    """A shard whose bytes changed without its files being cut short passes ``load_shard``'s
    checks; preprocessing writes finite values only, so NaN or inf there is damage."""
    from forecast_peft.data.cache import damaged_values, nonfinite_values

    shard = tmp_path / "cache" / "val" / "shard-00000"
    shutil.copytree(synth_root / "cache" / "val" / "shard-00000", shard)
    assert nonfinite_values(shard, chunk_rows) == [] and damaged_values(tmp_path / "cache", ("train", "val")) == []
    sound = load_shard(shard)
    ids, actors, lanes = sound.meta["scenario_id"], sound.arrays["actor_offsets"], sound.arrays["lane_offsets"]
    _overwrite(shard / "positions.npy", slice(actors[2], actors[2] + 1), np.nan)  # scene 2's focal track: 220 values
    _overwrite(shard / "positions.npy", (actors[5] - 1, 7, 0), np.inf)  # scene 4's last actor, one value
    _overwrite(shard / "lane_angles.npy", lanes[9], -np.inf)  # scene 9's first lane
    _overwrite(shard / "theta.npy", 15, np.nan)  # the last scene's
    _overwrite(shard / "lane_padding_mask.npy", lanes[1], True)  # booleans cannot be NaN: not read
    assert nonfinite_values(shard, chunk_rows) == [
        ("positions.npy", 221, [ids[2], ids[4]]),
        ("lane_angles.npy", 1, [ids[9]]),
        ("theta.npy", 1, [ids[15]]),
    ]
    assert damaged_values(tmp_path / "cache", ("train", "val")) == [
        (shard, f"{shard / 'positions.npy'} holds 221 NaN/inf values (scenario {ids[2]} and 1 other)"),
        (shard, f"{shard / 'lane_angles.npy'} holds 1 NaN/inf value (scenario {ids[9]})"),
        (shard, f"{shard / 'theta.npy'} holds 1 NaN/inf value (scenario {ids[15]})"),
    ]
    os.truncate(shard / "x_velocity.npy", 100)  # cut short: the cache check's to name, not read here
    assert damaged_values(tmp_path / "cache", ("train", "val")) == []


def test_a_damaged_cache_shard_is_cached_again(synth_root, tmp_path, capsys):
    root, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(synth_root / "train", root / "train")
    data = SimpleNamespace(root=str(root), cache_dir=str(cache), preprocess_workers=1, shard_size=10)
    ensure_cache(data, ["train"])
    before = _scenes_by_id(ForecastDataset(cache, "train"))
    shard = cache / "train" / "shard-00001"
    os.truncate(shard / "lane_positions.npy", 500)  # a disk that filled up, a copy cut short
    capsys.readouterr()
    ensure_cache(data, ["train"])  # every stage's start
    out = capsys.readouterr().out
    assert f"{shard}: damaged cache shard (lane_positions.npy: cut short): removed" in out
    assert "train: 24 scenarios, read 10, written 10, already cached 14" in out
    after = _scenes_by_id(ForecastDataset(cache, "train"))
    assert after.keys() == before.keys() and len(after) == 24
    for scenario_id, scene in before.items():
        for key, value in scene.items():
            np.testing.assert_array_equal(after[scenario_id][key], value, err_msg=f"{scenario_id} {key}")
    # a damaged shard of scenarios some of which left the data root: said, not silently dropped
    shard = cache / "train" / "shard-00000"
    gone = json.loads((shard / "meta.json").read_text())["source"][0]
    shutil.rmtree(gone)
    os.remove(shard / "x_attr.npy")
    ensure_cache(data, ["train"])
    out = capsys.readouterr().out
    assert f"{shard}: damaged cache shard (x_attr.npy is missing): removed" in out
    assert f"; not there any more, so gone from the cache: 1 scenario ({gone}...)" in out
    assert len(ForecastDataset(cache, "train")) == 23
    # a cache without its data root cannot be cached again: one line that names the shard
    shutil.rmtree(root / "train")
    shard = sorted((cache / "train").glob("shard-*"))[0]
    os.remove(shard / "origin.npy")
    ensure_cache(data, ["train"])
    with pytest.raises(UserError, match=rf"{shard.name}: damaged cache shard \(origin.npy is missing\); `fpeft prep"):
        ForecastDataset(cache, "train")
    (cache / "train" / INDEX_FILE).write_text("{")
    with pytest.raises(UserError, match=r"index.json: unreadable cache index .*`fpeft preprocess` writes it again"):
        ForecastDataset(cache, "train")
