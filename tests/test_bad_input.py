"""Every kind of bad input a careless user gives: one line naming the field or file, exit 2, before
any work (no Ray here: the preflight fails first). One category per test, cases parametrized."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from distributed_ebm.cli import main
from distributed_ebm.config import AttackConfig, TunePurificationConfig, load_config
from distributed_ebm.errors import ConfigError
from distributed_ebm.store import storage
from distributed_ebm.store.checkpoints import save_ebm

from .conftest import TEST_EXACT, tiny_ebm

ATTACK = ["attack.mode=defense", "data.count=2", "mlflow.enabled=false"]


def one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"debm {command}: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- configs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (b"data:\n\tcount: 2\n", "is not valid YAML: line 2, column 1"),
    (b"attack: {steps: 3\n", "is not valid YAML: line 2"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a text file"),
    (b"- 1\n- 2\n", "must hold a mapping at the top"),
    (b"ebm: ${DEBM_SHARED:-../shared}/x.pt\n", "Unsupported interpolation type DEBM_SHARED (environment variables"),
    (b"ebm: ${oc.env:SURELY_NOT_SET_16}\n", "Environment variable 'SURELY_NOT_SET_16' not found"),
])
def test_config_files_that_do_not_parse(tmp_path, capsys, text, expected):
    f = tmp_path / "bad.yaml"
    f.write_bytes(text)
    assert main(["attack", "--config", str(f), *ATTACK]) == 2
    err = one_line(capsys, "attack")
    assert str(f) in err and expected in err


@pytest.mark.parametrize("override, expected", [
    ("attack.steps=true", "attack.steps = True: Input should be a valid integer"),
    ("purify.noise=.nan", "purify.noise = nan: Input should be a finite number"),
    ("purify.step_size=.inf", "purify.step_size = inf: Input should be a finite number"),
    ("data.indices=[3,4,3]", "data.indices names ids [3] more than once"),
    ("attack.steps", "is not of the form key=value"),
    ("attack..steps=3", "is not of the form key=value"),
])
def test_config_values_refused(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(AttackConfig, None, ["ebm=x.pt", override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_search_space_overrides_change_one_entry():
    base = load_config(TunePurificationConfig, "jobs/configs/tune_purification.yaml")
    one = load_config(TunePurificationConfig, "jobs/configs/tune_purification.yaml", ["space.steps.high=100"])
    assert one.space["steps"].high == 100 and one.space["steps"].low == base.space["steps"].low
    assert one.space["noise"] == base.space["noise"] and one.space["step_size"] == base.space["step_size"]
    two = load_config(TunePurificationConfig, None, ["space.steps={low: 10, high: 50}", "space.noise=null"])
    assert set(two.space) == {"step_size", "steps"} and (two.space["steps"].low, two.space["steps"].high) == (10, 50)


# --- checkpoints -----------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates a file: the proof that a checkpoint's code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _ebm_file(tmp_path, kind: str) -> str:
    url = str(tmp_path / f"{kind}.pt")
    if kind in ("empty", "truncated", "random"):
        good = io.BytesIO()
        torch.save({"kind": "ebm", **tiny_ebm().spec(), "state_dict": tiny_ebm().state_dict()}, good)
        data = {"empty": b"", "truncated": good.getvalue()[:300],
                "random": np.random.default_rng(0).bytes(4096)}[kind]
        open(url, "wb").write(data)
    elif kind == "hostile_zip":
        torch.save({"kind": "ebm", "x": _Payload(str(tmp_path / "PWNED"))}, url)
    elif kind == "hostile_pickle":
        open(url, "wb").write(pickle.dumps(_Payload(str(tmp_path / "PWNED")), protocol=2))
    elif kind == "wrong_width":
        ebm = tiny_ebm(width=4)
        torch.save({"kind": "ebm", **{**ebm.spec(), "width": 8}, "state_dict": ebm.state_dict()}, url)
    elif kind == "lacks_keys":
        torch.save({"kind": "ebm", "width": 4, "image_size": 32}, url)
    elif kind == "lacks_tensors":
        ebm = tiny_ebm()
        state = ebm.state_dict()
        state.pop("net.0.weight")
        torch.save({"kind": "ebm", **ebm.spec(), "state_dict": state}, url)
    elif kind in ("nan", "inf"):
        ebm = tiny_ebm()
        with torch.no_grad():
            ebm.net[2].weight[0, 0, 0, 0] = float(kind)
        save_ebm(ebm, url)
    return url


@pytest.mark.parametrize("kind, expected", [
    ("empty", "cannot be read (it is empty)"),
    ("truncated", "cannot be read"),
    ("random", "cannot be read"),
    ("hostile_zip", "cannot be read"),
    ("hostile_pickle", "cannot be read"),
    ("wrong_width", "its tensors do not fit an EBM of width 8"),
    ("lacks_keys", "lacks channels, state_dict"),
    ("lacks_tensors", "its tensors do not fit an EBM of width 4"),
    ("nan", "hold NaN or inf (e.g. net.2.weight)"),
    ("inf", "hold NaN or inf (e.g. net.2.weight)"),
])
def test_bad_ebm_checkpoints(tmp_path, capsys, kind, expected):
    url = _ebm_file(tmp_path, kind)
    assert main(["attack", f"ebm={url}", f"output={tmp_path}/out", *ATTACK]) == 2
    err = one_line(capsys, "attack")
    assert url in err and expected in err
    assert "weights_only" not in err and "unsafe" not in err.lower()
    assert not (tmp_path / "PWNED").exists()  # the payload never ran
    assert not (tmp_path / "out").exists()  # nothing was attacked


def test_bad_classifier_weights(tmp_path, capsys):
    url = str(tmp_path / "clf.th")
    open(url, "wb").write(b"not a checkpoint")
    assert main(["attack", f"classifier.weights={url}", "attack.mode=pgd", *ATTACK[1:]]) == 2
    assert url in one_line(capsys, "attack")


# --- data ------------------------------------------------------------------------------------

def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(tmp_path, images, labels, label_type=pa.int64(), index=None) -> str:
    url = str(tmp_path / "data.parquet")
    img = pa.array([{"bytes": b, "path": None} for b in images],
                   type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    columns = {"img": img, "label": pa.array(labels, type=label_type)}
    if index is not None:
        columns["index"] = pa.array(index, type=pa.int64())
    pq.write_table(pa.table(columns), url)
    return url


@pytest.mark.parametrize("case, expected", [
    ("string_labels", "column label is string, expected integers"),
    ("label_too_big", "labels must lie in [0, 10) (classifier.num_classes), found 10"),
    ("negative_label", "labels must lie in [0, 10) (classifier.num_classes), found -1"),
    ("folder", "is a folder, not a file"),
    # an index column that repeats or holds a negative id is refused, not replaced by the row numbers (records and
    # keyed randomness would then name other images than the file's)
    ("index_repeats", "index names id 7 2 times (rows [0, 2]); each image needs an id of its own"),
    ("index_negative", "index holds the negative id -3 (row 1); image ids must be >= 0"),
])
def test_bad_data_files(tmp_path, capsys, case, expected):
    if case == "folder":
        url = str(tmp_path)
    elif case.startswith("index_"):
        url = _parquet(tmp_path, [_png()] * 3, [0, 1, 2], index=[7, 8, 7] if case == "index_repeats" else [4, -3, 5])
    elif case == "string_labels":
        url = _parquet(tmp_path, [_png()] * 3, ["cat", "dog", "cat"], pa.string())
    else:
        url = _parquet(tmp_path, [_png()] * 3, [0, 10 if case == "label_too_big" else -1, 2])
    assert _attack(url, tmp_path) == 2
    err = one_line(capsys, "attack")
    assert url in err and expected in err


def test_image_bytes_that_do_not_decode_fail_on_the_cluster_in_one_line(ray_local, tmp_path, capsys):
    """Decoded in Ray Data's tasks, on the session's Ray (a Ray of its own would add its start-up): where it runs,
    then one line."""
    capsys.readouterr()  # what starting the Ray printed
    url = _parquet(tmp_path, [_png(), b"GIF89a but not really", _png()], [0, 1, 2])
    assert _attack(url, tmp_path) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    devices, rest = lines[0], "\n".join(lines[1:])
    assert devices.startswith("attack:pgd: 1 actor(s) on CPU (the cluster has no GPU"), devices  # auto, no GPU
    print(rest, file=sys.stderr)
    err = one_line(capsys, "attack")
    assert url in err and "row 1's image bytes are not a readable image" in err


def _attack(url: str, tmp_path) -> int:
    return main(["attack", f"data.path={url}", "attack.mode=pgd", "data.count=3", "mlflow.enabled=false",
                 f"output={tmp_path}/out"])


# --- destinations and services ---------------------------------------------------------------

@pytest.fixture
def no_s3_credentials(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("AWS_") and k != "AWS_CA_BUNDLE":
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("key", ["output", "data.path", "ebm"])
def test_s3_without_credentials(no_s3_credentials, tmp_path, capsys, key):
    values = {"output": f"output={tmp_path}/out", "data.path": f"data.path={TEST_EXACT}", "ebm": "attack.mode=pgd"}
    values[key] = f"{key}=s3://debm-no-such-bucket/x"
    mode = "attack.mode=defense" if key == "ebm" else values.pop("ebm")
    assert main(["attack", *values.values(), mode, "data.count=2", "mlflow.enabled=false"]) == 2
    err = one_line(capsys, "attack")
    assert "s3://debm-no-such-bucket/x: cannot reach it (NoCredentialsError" in err and "AWS_ENDPOINT_URL" in err


def test_train_output_on_s3_without_credentials(no_s3_credentials, capsys):
    assert main(["train-ebm", f"data.path={TEST_EXACT}", "data.count=64", "batch_size=8", "mlflow.enabled=false",
                 "output=s3://debm-no-such-bucket/ebm"]) == 2
    assert "cannot reach it (NoCredentialsError" in one_line(capsys, "train-ebm")


@pytest.mark.parametrize("command", ["attack", "train-ebm"])
def test_output_under_a_file(tmp_path, capsys, command):
    (tmp_path / "file").write_text("x")
    args = ["attack.mode=pgd", "data.count=2"] if command == "attack" else [f"data.path={TEST_EXACT}", "data.count=64",
                                                                            "batch_size=8"]
    assert main([command, *args, "mlflow.enabled=false", f"output={tmp_path}/file/out"]) == 2
    assert f"output {tmp_path}/file/out: {tmp_path}/file is a file" in one_line(capsys, command)


@pytest.mark.parametrize("command", ["attack", "train-ebm", "train-classifier"])
def test_output_that_is_a_file(tmp_path, capsys, command):
    """Refused in one line before the job starts Ray or does any work, not with a traceback at its first write."""
    (tmp_path / "file").write_text("x")
    args = {"attack": ["attack.mode=pgd", "data.count=2"],
            "train-ebm": [f"data.path={TEST_EXACT}", "data.count=64", "batch_size=8"],
            "train-classifier": [f"data.path={TEST_EXACT}", "data.count=8", "test_data=null"]}[command]
    assert main([command, *args, "mlflow.enabled=false", f"output={tmp_path}/file"]) == 2
    assert f"output {tmp_path}/file is a file; it must be a folder (or not exist yet)" in one_line(capsys, command)


def test_run_names_and_bank_shards_that_cannot_work(tmp_path, capsys):
    """Refused up front: name=.. would write the run beside `output`, not in it; more bank shards than chains
    would hang the run."""
    base = [f"data.path={TEST_EXACT}", "data.count=64", "batch_size=8", "mlflow.enabled=false", f"output={tmp_path}/o"]
    assert main(["train-ebm", *base, "name=.."]) == 2
    assert "name = '..': '..' is not a folder name of its own" in one_line(capsys, "train-ebm")
    assert main(["train-ebm", *base, "bank_size=16", "ray.bank_shards=17"]) == 2
    assert "ray.bank_shards = 17 is more than the bank's 16 chains (bank_size)" in one_line(capsys, "train-ebm")
    assert not (tmp_path / "o").exists()


def test_one_gpu_job_refuses_an_out_that_is_a_file_and_names_a_missing_card_folder(tmp_path, capsys):
    def gpu_main(argv):
        return main(["train-ebm-gpu", *argv])

    (tmp_path / "file").write_text("x")
    assert gpu_main(["--minutes", "1", "--out", str(tmp_path / "file"), f"data.path={TEST_EXACT}"]) == 2
    assert f"--out {tmp_path}/file is a file" in capsys.readouterr().err
    assert gpu_main(["--card", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err  # names the checkpoint --card reads, not --resume
    assert (err.count("\n") == 1 and f"checkpoint {tmp_path}/none/ckpt.pt does not exist" in err
            and "--resume" not in err)


@pytest.mark.parametrize("uri", ["bogus://nowhere", "not-a-store", "http://127.0.0.1:9"])
def test_bogus_tracking_uri(tmp_path, capsys, uri):
    assert main(["attack", "attack.mode=pgd", "data.count=2", f"output={tmp_path}/out",
                 f"mlflow.tracking_uri={uri}"]) == 2
    assert f"mlflow.tracking_uri {uri}: not a usable tracking store" in one_line(capsys, "attack")
    assert not (tmp_path / "out").exists()


def test_one_channel_ebm_on_rgb_data(tmp_path, capsys):
    assert main(["train-ebm", f"data.path={TEST_EXACT}", "data.count=64", "batch_size=8", "ebm.channels=1",
                 "mlflow.enabled=false", f"output={tmp_path}"]) == 2
    assert "ebm.channels = 1 but the images of" in one_line(capsys, "train-ebm")


# --- debm report -----------------------------------------------------------------------------

GOOD = "results/undefended_pgd.json"


def _summary(tmp_path, case: str) -> str:
    folder = tmp_path / case
    folder.mkdir()
    good = json.load(open(GOOD))
    body = {"junk": "{not json", "list": "[1, 2, 3]",
            "no_keys": json.dumps({"hello": 1}),
            "string_number": json.dumps({**good, "natural_protocol_accuracy": "0.9"}),
            "string_in_config": json.dumps({**good, "config": {**good["config"],
                                            "attack": {**good["config"]["attack"], "steps": "50"}}}),
            "binary": None}[case]
    if body is None:
        (folder / "summary.json").write_bytes(b"\xff\xfe\x00\x89")
    else:
        (folder / "summary.json").write_text(body)
    return str(folder)


@pytest.mark.parametrize("case, expected", [
    ("junk", "is not valid JSON"), ("list", "holds a list, not the summary object"),
    ("no_keys", "images: Field required"),
    ("string_number", "natural_protocol_accuracy: Input should be a valid number"),
    ("string_in_config", "config.attack.steps: Input should be a valid integer"), ("binary", "is not valid JSON"),
])
def test_report_bad_summaries(tmp_path, capsys, case, expected):
    folder = _summary(tmp_path, case)
    assert main(["report", folder]) == 2
    err = one_line(capsys, "report")
    assert f"{folder}/summary.json" in err and expected in err


def test_report_plot_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "good"
    folder.mkdir()
    (folder / "summary.json").write_text(open(GOOD).read())
    assert main(["report", str(folder), "--plot", f"{tmp_path}/file/plot.png"]) == 2
    assert f"{tmp_path}/file is a file" in one_line(capsys, "report")
    assert main(["report", str(folder), "--plot", f"{tmp_path}/plots/a.png"]) == 0
    assert storage.read_bytes(f"{tmp_path}/plots/a.png")[:4] == b"\x89PNG"


# --- the console script ----------------------------------------------------------------------

def test_job_file_says_one_line_for_a_hostile_checkpoint(tmp_path):
    url = _ebm_file(tmp_path, "hostile_zip")
    done = subprocess.run([sys.executable, "jobs/attack.py", f"ebm={url}", f"output={tmp_path}/out", *ATTACK],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot be read" in done.stderr and not (tmp_path / "PWNED").exists()
